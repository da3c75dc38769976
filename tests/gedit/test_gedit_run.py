"""step1x-edit-gedit end to end: a tiny GEdit-Bench in the real format, edited by tiny models into the
official layout, judged by a real HTTP server on 127.0.0.1 (scripted answers), by the tiny Qwen2.5-VL
(gibberish: recorded parse failures) and by a scripted judge through the Python API."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from step1x_core.batch.manifest import ManifestError
from step1x_core.commands.gedit import main
from step1x_core.gedit.dataset import TASK_TYPES, load_gedit
from step1x_core.gedit.judges import HttpJudge, JudgeError, JudgeUnavailable
from step1x_core.gedit.scoring import score_samples
from step1x_core.gedit.stats import AVERAGE
from step1x_core.testing.gedit_data import ScriptedJudge, write_tiny_gedit
from tests.release_names import QWEN_FOLDER

datasets = pytest.importorskip("datasets")

TASKS = ("background_change", "color_alter")
EDIT = ["--size-level", "64", "--steps", "2"]
KEY_ENV = "STEP1X_TEST_JUDGE_KEY"
# What the scripted HTTP judge answers, by the instruction's task type and language (the SC prompt carries
# the instruction; the PQ prompt does not, so PQ answers follow the SC question just asked).
SC_ANSWERS = {
    ("background_change", "en"): '||V^=^V||\n{\n"score" : [8, 6],\n"reasoning" : "ok"\n}\n||V^=^V||',  # SC 6
    ("background_change", "cn"): "[4, 9]",  # SC 4
    ("color_alter", "en"): "{score: 10, reasoning: good}",  # SC 10
    ("color_alter", "cn"): "no idea",  # unreadable twice: a parse failure
}
PQ_ANSWERS = {
    ("background_change", "en"): '{"score": [7, 9], "reasoning": "fine"}',  # PQ 7
    ("background_change", "cn"): "9",  # PQ 9
    ("color_alter", "en"): '```json\n{"score": [5, 8]}\n```',  # PQ 5
    ("color_alter", "cn"): "[5, 5]",
}


class Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that answers from the tables above."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if server.status != 200:
            return self._reply(server.status, {"error": {"message": "scripted failure"}})
        prompt = body["messages"][0]["content"][0]["text"]
        if "Editing instruction:" in prompt:
            instruction = prompt.rsplit("Editing instruction: ", 1)[1].strip()
            task = next(t for t in TASKS if t in instruction)
            server.last = (task, "en" if instruction.startswith("make") else "cn")
            answer = SC_ANSWERS[server.last]
        else:
            answer = PQ_ANSWERS[server.last]
        self._reply(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})

    def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    server.requests, server.status, server.last, server.timeout = [], 200, None, 10
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def gedit_data(tmp_path_factory):
    return write_tiny_gedit(tmp_path_factory.mktemp("gedit") / "GEdit-Bench", task_types=TASKS, per_task=2,
                            layout="parquet")


def _http_args(server) -> list[str]:
    return ["--judge", "http", "--judge-url", f"http://127.0.0.1:{server.server_address[1]}/v1",
            "--judge-model", "judge-x", "--judge-key-env", KEY_ENV]


@pytest.fixture(scope="module")
def gedit_run(gedit_data, tiny_models, judge_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("gedit-out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, "sekret")
        code = main(["--data", str(gedit_data), "--out", str(out), "--models-dir", str(tiny_models), *EDIT,
                     *_http_args(judge_server), "--quiet"])
    return out, code, list(judge_server.requests)


def _pixels(source) -> np.ndarray:
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.slow
def test_edits_land_in_the_official_layout(gedit_run, gedit_data):
    out, code, _ = gedit_run
    assert code == 1  # color_alter/cn could not be scored
    samples = load_gedit(gedit_data)
    assert len(samples) == 8 and {s.language for s in samples} == {"en", "cn"}
    for s in samples:
        folder = out / "fullset" / s.task_type / s.language
        edited, source = folder / f"{s.key}.png", folder / f"{s.key}_SRCIMG.png"
        assert (_pixels(source) == _pixels(io.BytesIO(s.input_image))).all()  # the dataset's input_image
        assert _pixels(edited).shape == _pixels(io.BytesIO(s.input_image_raw)).shape  # the raw image, edited
    results = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in results] == [s.item_id for s in samples] and all(r["status"] == "ok" for r in results)


@pytest.mark.slow
def test_the_http_judge_is_asked_as_the_official_client_asks(gedit_run):
    out, _, requests = gedit_run
    assert len(requests) == 2 * 8 + 2  # SC and PQ per sample; the 2 color_alter/cn SC questions asked again
    for request in requests:
        assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sekret"
        assert request["body"]["model"] == "judge-x" and request["body"]["max_tokens"] == 1400
        content = request["body"]["messages"][0]["content"]
        assert content[0]["type"] == "text" and all(part["type"] == "image_url" for part in content[1:])
        assert len(content) == (3 if "Editing instruction:" in content[0]["text"] else 2)
        for part in content[1:]:
            header, data = part["image_url"]["url"].split(",", 1)
            assert header == "data:image/jpeg;base64"
            assert Image.open(io.BytesIO(base64.b64decode(data))).format == "JPEG"


@pytest.mark.slow
def test_statistics_from_the_scripted_answers(gedit_run):
    out, _, _ = gedit_run
    folder = out / "viescore" / "http-judge-x"
    rows = {(r["language"], r["subset"], r["task_type"]): r
            for r in csv.DictReader((folder / "statistics.csv").open(encoding="utf-8"))}
    expected = {  # (scored, unscored, SC, PQ, O), by hand from the answers above; 2 samples per task type
        ("en", "fullset", "background_change"): (2, 0, 6, 7, math.sqrt(42)),
        ("en", "fullset", "color_alter"): (2, 0, 10, 5, math.sqrt(50)),
        ("en", "fullset", AVERAGE): (4, 0, 8, 6, (math.sqrt(42) + math.sqrt(50)) / 2),
        ("en", "intersection", AVERAGE): (2, 0, 8, 6, (math.sqrt(42) + math.sqrt(50)) / 2),
        ("cn", "fullset", "background_change"): (2, 0, 4, 9, 6),
        ("cn", "fullset", AVERAGE): (2, 2, 4, 9, 6),  # color_alter has no score: the mean is over one type
    }
    for key, (scored, unscored, *scores) in expected.items():
        row = rows[key]
        assert (int(row["scored"]), int(row["unscored"])) == (scored, unscored), key
        assert [float(row[k]) for k in ("SC", "PQ", "O")] == pytest.approx(scores), key
    assert rows[("cn", "fullset", "color_alter")]["SC"] == ""
    verdicts = [json.loads(line) for line in (folder / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
    failed = [v for v in verdicts if v["status"] == "parse_failure"]
    assert len(failed) == 2 and failed[0]["answers"]["SC"] == ["no idea", "no idea"]
    assert "| **average** | 4 | 0 | 8.000 | 6.000 | 6.776 |" in (folder / "statistics.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_rerun_neither_edits_nor_asks_again(gedit_run, gedit_data, tiny_models, judge_server, monkeypatch):
    out, _, _ = gedit_run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    asked = len(judge_server.requests)
    monkeypatch.setenv(KEY_ENV, "sekret")
    assert main(["--data", str(gedit_data), "--out", str(out), "--models-dir", str(tiny_models), *EDIT,
                 *_http_args(judge_server), "--quiet"]) == 1
    assert len(judge_server.requests) == asked
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps


@pytest.mark.slow
def test_the_tiny_qwen_as_judge_gives_recorded_parse_failures(gedit_run, gedit_data, tiny_models):
    out, _, _ = gedit_run
    qwen = tiny_models / "text_encoders" / QWEN_FOLDER
    code = main(["--data", str(gedit_data), "--out", str(out), "--stage", "score", "--languages", "en",
                 "--task-types", "background_change", "--judge", "qwen", "--judge-model", str(qwen),
                 "--judge-device", "cpu", "--judge-max-tokens", "12", "--quiet"])
    assert code == 1
    folder = out / "viescore" / "qwen-Qwen2.5-VL-7B-Instruct"
    verdicts = [json.loads(line) for line in (folder / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(verdicts) == 2 and all(v["status"] == "parse_failure" for v in verdicts)
    assert all(len(v["answers"]["SC"]) == 2 and v["answers"]["SC"][0].strip() for v in verdicts)
    assert "| **average** | 0 | 2 | – | – | – |" in (folder / "statistics.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_scripted_judge_through_the_python_api_rescores_only_a_changed_edit(gedit_run, gedit_data):
    out, _, _ = gedit_run
    samples = load_gedit(gedit_data, languages=("cn",))
    judge = ScriptedJudge(lambda prompt, images: "[3, 4]", name="scripted")
    verdicts = score_samples(samples, out, judge, progress=False)
    assert len(judge.asked) == 2 * len(samples)
    assert {verdicts[s.item_id]["O"] for s in samples} == {math.sqrt(9)}
    Image.new("RGB", (30, 20), (1, 2, 3)).save(samples[0].edited_path(out))  # the edit is redone
    score_samples(samples, out, judge, progress=False)
    assert len(judge.asked) == 2 * len(samples) + 2


def test_http_judge_retries_a_busy_server_and_stops_on_a_refused_key(judge_server):
    judge = HttpJudge(f"http://127.0.0.1:{judge_server.server_address[1]}/v1", "judge-x", retry_delays=(0.01,))
    judge_server.status = 503
    try:
        with pytest.raises(JudgeError, match="HTTP 503") as err:
            judge.ask([Image.new("RGB", (8, 8))], "PQ?")
        assert not isinstance(err.value, JudgeUnavailable)  # a busy judge fails this item only
        judge_server.status = 401
        with pytest.raises(JudgeUnavailable, match="HTTP 401.*API key"):
            judge.ask([Image.new("RGB", (8, 8))], "PQ?")
    finally:
        judge_server.status = 200
    closed = HttpJudge("http://127.0.0.1:9/v1", "judge-x", retry_delays=(0.01,), timeout=5)
    with pytest.raises(JudgeUnavailable, match="cannot reach the judge"):
        closed.ask([Image.new("RGB", (8, 8))], "PQ?")


def test_judge_options_are_checked_before_any_edit(gedit_data, tiny_models, tmp_path, capsys):
    base = ["--data", str(gedit_data), "--out", str(tmp_path / "out"), "--models-dir", str(tiny_models)]
    assert main([*base, "--judge", "qwen", "--judge-model", str(tmp_path / "nowhere")]) == 2
    assert main(base) == 2
    assert main([*base, "--judge", "http", "--judge-model", "m"]) == 2
    errors = [line for line in capsys.readouterr().err.strip().splitlines()
              if not line.startswith("Generating train split")]  # datasets' progress on a first load
    assert len(errors) == 3 and all(line.startswith("step1x-edit-gedit: error: ") for line in errors)
    assert "no such folder" in errors[0] and "needs a judge" in errors[1] and "--judge-url" in errors[2]
    assert not (tmp_path / "out").exists()


def test_gedit_layouts_and_a_table_that_is_not_gedit(gedit_data, tmp_path):
    on_disk = write_tiny_gedit(tmp_path / "disk", task_types=TASKS, per_task=2, layout="save_to_disk")
    assert [s.item_id for s in load_gedit(on_disk)] == [s.item_id for s in load_gedit(gedit_data)]
    assert {s.language for s in load_gedit(on_disk, languages=("cn",))} == {"cn"}
    other = tmp_path / "other"
    datasets.Dataset.from_dict({"id": ["a"], "instruction": ["x"]}).save_to_disk(str(other))
    with pytest.raises(ManifestError, match="is not GEdit-Bench: it lacks the column"):
        load_gedit(other)


@pytest.mark.slow
def test_an_unreadable_sample_is_named_recorded_and_the_rest_edited(tiny_models, tmp_path, caplog):
    data = write_tiny_gedit(tmp_path / "GEdit-Bench", task_types=TASKS[:1], languages=("en",), per_task=2,
                            layout="parquet", unreadable=[1])
    good, broken = load_gedit(data)
    out = tmp_path / "out"
    code = main(["--data", str(data), "--out", str(out), "--models-dir", str(tiny_models), *EDIT, "--stage", "edit",
                 "--quiet"])
    assert code == 1  # some samples failed, as for any failed edit
    named = (f"GEdit-Bench sample {broken.key} (background_change, en): its input_image is not an image "
             "Pillow can read")
    assert any(named in r.getMessage() for r in caplog.records)
    assert "BytesIO" not in caplog.text
    results = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text(encoding="utf-8").splitlines())}
    assert list(results) == [good.item_id, broken.item_id]
    assert results[broken.item_id]["status"] == "error" and named in results[broken.item_id]["error"]
    assert results[good.item_id]["status"] == "ok" and good.edited_path(out).is_file()
    assert not broken.edited_path(out).exists() and not broken.source_path(out).exists()


@pytest.mark.slow
def test_official_per_task_type_files_are_written_where_the_official_script_reads(gedit_run):
    out, _, _ = gedit_run
    folder = out / "viescore" / "http-judge-x"
    official = folder / out.name / "gpt4o" / "eval_results_new"  # --save_path FOLDER --model_name OUT's name
    assert sorted(p.name for p in official.iterdir()) == sorted(f"{out.name}_{t}_gpt_score.csv" for t in TASK_TYPES)
    rows = list(csv.DictReader((official / f"{out.name}_background_change_gpt_score.csv").open(encoding="utf-8")))
    assert [(r["instruction_language"], r["sementics_score"], r["quality_score"]) for r in rows] == \
        [("en", "6", "7"), ("cn", "4", "9"), ("en", "6", "7"), ("cn", "4", "9")]
    color = list(csv.DictReader((official / f"{out.name}_color_alter_gpt_score.csv").open(encoding="utf-8")))
    assert {r["instruction_language"] for r in color} == {"en"}  # the cn parse failures are left out
