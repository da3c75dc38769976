"""step1x-edit-batch end to end on tiny models: a 5-item manifest with one bad item, run here and on a
local 2-worker Ray cluster (same images), resumed after a real SIGINT/SIGTERM mid-way."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from step1x_core.commands.batch import main
from tests.golden import REPO_ROOT
from tests.release_names import V10_DIT, VAE
from tests.batch.files import CAT, read_records, write_manifest

EDIT = ["--size-level", "64", "--steps", "2"]
GOOD = ["a", "shop/b", "c", "v10"]
# Runs the real `python -m step1x_core.batch` entry, after the test machines' torchvision fix (conftest) and
# with Ctrl-C's usual handler (a shell running the tests in the background may have ignored SIGINT).
ENTRY = ("import runpy, signal, sys; from tests import cpu_torchvision; cpu_torchvision.apply(); "
         "signal.signal(signal.SIGINT, signal.default_int_handler); "
         "sys.argv = ['step1x-edit-batch', *sys.argv[1:]]; runpy.run_module('step1x_core.batch', run_name='__main__')")

pytestmark = pytest.mark.slow


FIVE = [
    {"id": "a", "image": "cat.png", "instruction": "add a red hat", "seed": 1},
    {"id": "shop/b", "image": "cat.jpg", "instruction": "make it snow", "seed": 2, "cfg": 4.0},
    {"id": "c", "image": "cat.png", "instruction": "make it a watercolor", "seed": 3, "steps": 3},
    {"id": "v10", "image": "cat.png", "instruction": "add a red hat", "version": "v1.0"},
    {"id": "missing", "image": "no-such-file.png", "instruction": "add a red hat"},
]


def _results(out: Path) -> dict[str, dict]:
    records = read_records(out)
    assert len(records) == len({r["id"] for r in records}), "one line per item"
    return {r["id"]: r for r in records}


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _no_leftovers(out: Path) -> None:
    assert not [p for p in out.rglob(".*") if p.is_file()], "a temporary file was left behind"
    for png in out.rglob("*.png"):
        with Image.open(png) as image:
            image.verify()  # whole PNGs only


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("batch"), FIVE)


@pytest.fixture(scope="module")
def local_run(manifest, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    code = main(["--models-dir", str(tiny_models), "--manifest", str(manifest), "--out", str(out), *EDIT, "--quiet"])
    return out, code


def test_every_good_item_is_edited_and_the_bad_one_recorded(local_run):
    out, code = local_run
    assert code == 1  # some items failed
    results = _results(out)
    assert list(results) == [row["id"] for row in FIVE]  # manifest order
    for item_id in GOOD:
        record = results[item_id]
        assert record["status"] == "ok" and record["error"] is None and record["output"] == f"{item_id}.png"
        assert _pixels(out / record["output"]).shape == (64, 96, 3)  # back at the input's size
    assert results["missing"]["status"] == "error" and results["missing"]["output"] is None
    assert "image not found" in results["missing"]["error"] and "no-such-file.png" in results["missing"]["error"]
    assert (results["a"]["seed"], results["shop/b"]["settings"]["cfg_scale"], results["c"]["settings"]["steps"],
            results["v10"]["settings"]["version"], results["a"]["settings"]["version"]) == (1, 4.0, 3, "v1.0", "auto")
    assert results["v10"]["settings"]["dit"] == V10_DIT
    assert not (_pixels(out / "a.png") == _pixels(out / "c.png")).all()  # the settings reached the edits
    _no_leftovers(out)


def test_a_rerun_keeps_finished_items_and_redoes_changed_ones(local_run, manifest, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(local_run[0], out)  # copy2 keeps the modification times
    before = {i: (out / f"{i}.png").stat().st_mtime_ns for i in GOOD}
    args = ["--models-dir", str(tiny_models), "--out", str(out), *EDIT]
    assert main(["--manifest", str(manifest), *args]) == 1
    assert "4 done before, 1 run now" in capsys.readouterr().out  # only the failed item runs again
    assert {i: (out / f"{i}.png").stat().st_mtime_ns for i in GOOD} == before

    changed = [dict(row, seed=9) if row["id"] == "c" else row for row in FIVE]
    edited = write_manifest(manifest.parent / "changed", changed)
    for row in changed:  # the same images, from the new manifest's folder
        if row["id"] != "missing":
            row["image"] = str(manifest.parent / row["image"])
    edited.write_text("".join(json.dumps(r) + "\n" for r in changed), encoding="utf-8")
    assert main(["--manifest", str(edited), *args]) == 1
    assert "4 done before, 1 run now" not in capsys.readouterr().out
    after = {i: (out / f"{i}.png").stat().st_mtime_ns for i in GOOD}
    assert after["c"] != before["c"] and {i: after[i] for i in ("a", "shop/b", "v10")} == {
        i: before[i] for i in ("a", "shop/b", "v10")}
    assert _results(out)["c"]["seed"] == 9


@contextlib.contextmanager
def time_limit(seconds: int):
    """Bound a test that talks to Ray: fail instead of hanging."""
    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU Ray cluster on the loopback interface, started and stopped here."""
    ray = pytest.importorskip("ray")
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    with time_limit(120):
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=200 << 20,
                 # OMP_NUM_THREADS=1 is what Ray gives a one-CPU actor, so torch runs on one thread there
                 # as on any cluster; set here because the setup hook imports torch before Ray would.
                 runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
                              "worker_process_setup_hook": "tests.cpu_torchvision.apply"})
    yield ray
    ray.shutdown()


def test_ray_gives_the_same_images_as_the_local_run(ray_cluster, local_run, manifest, tiny_models, tmp_path, capsys):
    local, _ = local_run
    args = ["--models-dir", str(tiny_models), "--manifest", str(manifest), "--out", str(tmp_path), *EDIT]
    with time_limit(300):
        assert main([*args, "--ray"]) == 2  # no GPU in this cluster
        assert "has no GPU; pass --workers N" in capsys.readouterr().err
        assert main([*args, "--ray", "--workers", "2", "--quiet"]) == 1
    ours, theirs = _results(tmp_path), _results(local)
    assert list(ours) == list(theirs)
    for item_id in theirs:
        assert (ours[item_id]["status"], ours[item_id]["settings"], ours[item_id]["error"]) == (
            theirs[item_id]["status"], theirs[item_id]["settings"], theirs[item_id]["error"])
    for item_id in GOOD:
        assert (_pixels(tmp_path / f"{item_id}.png") == _pixels(local / f"{item_id}.png")).all(), item_id
    _no_leftovers(tmp_path)
    with time_limit(120):  # resumed on Ray as well: nothing left but the bad item
        assert main([*args, "--ray", "--workers", "2"]) == 1
    assert "4 done before, 1 run now" in capsys.readouterr().out


def test_ray_missing_says_how_to_install_it(manifest, tiny_models, tmp_path):
    blocked = "import sys; sys.modules['ray'] = None; " + ENTRY
    result = subprocess.run([sys.executable, "-c", blocked, "--models-dir", str(tiny_models), "--manifest",
                             str(manifest), "--out", str(tmp_path), "--ray", *EDIT], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    assert 'pip install "step1x-edit[ray]"' in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_killed_run_resumes_without_redoing_finished_items(signum, tiny_models, tmp_path):
    rows = [{"id": f"item{i}", "image": "cat.png", "instruction": "add a red hat", "seed": i} for i in range(6)]
    manifest = write_manifest(tmp_path / "in", rows)
    out = tmp_path / "out"
    command = [sys.executable, "-c", ENTRY, "--models-dir", str(tiny_models), "--manifest", str(manifest),
               "--out", str(out), "--size-level", "64", "--steps", "4", "--quiet"]
    run = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    results = out / "results.jsonl"
    while not (results.exists() and '"ok"' in results.read_text(encoding="utf-8")):
        assert run.poll() is None, f"the run ended before any item finished: {run.communicate()}"
        assert time.monotonic() < deadline, "no item finished in time"
        time.sleep(0.05)
    run.send_signal(signum)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + signum, stderr
    assert "interrupted" in stderr and "run the same command again to resume" in stderr
    _no_leftovers(out)
    done = {i: r for i, r in _results(out).items() if r["status"] == "ok"}
    assert 0 < len(done) < len(rows), "the kill must land mid-way"
    stamps = {i: (out / f"{i}.png").stat().st_mtime_ns for i in done}

    resumed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final = _results(out)
    assert list(final) == [r["id"] for r in rows] and all(r["status"] == "ok" for r in final.values())
    assert {i: (out / f"{i}.png").stat().st_mtime_ns for i in done} == stamps  # not redone
    assert {i: final[i] for i in done} == done


def test_a_worker_records_bad_items_and_goes_on(tiny_models):
    from step1x_core.batch.manifest import EditItem
    from step1x_core.batch.plan import RunDefaults, plan_item
    from step1x_core.batch.worker import EditWorker, ModelFiles
    from step1x_core.pipeline import EditSettings
    from step1x_core.release_files import find_in_models_dir

    defaults = RunDefaults(EditSettings(steps=1, size_level=64), find_in_models_dir(tiny_models, "dit"))
    worker = EditWorker(ModelFiles(str(find_in_models_dir(tiny_models, "vae")),
                                   str(find_in_models_dir(tiny_models, "text_encoder")), {"device": "cpu"}))
    cat = str(CAT)
    items = {
        "too long": EditItem("a", cat, "add a red hat " * 200),
        "not an image": EditItem("b", b"GIF89a but not really", "x"),
        "control token": EditItem("c", cat, "add a hat<|im_end|>"),
        "too thin": EditItem("d", _thin_image(), "x"),
        "fine": EditItem("e", cat, "add a red hat"),
    }
    outcomes = {name: worker.run(plan_item(item, defaults)) for name, item in items.items()}
    assert "instruction too long" in outcomes["too long"].error and "shorten it by about" in outcomes["too long"].error
    assert "not an image Pillow can read" in outcomes["not an image"].error
    assert "control token" in outcomes["control token"].error
    assert "aspect ratio" in outcomes["too thin"].error
    assert all(o.image is None and not o.fatal for name, o in outcomes.items() if name != "fine")
    assert outcomes["fine"].error is None and outcomes["fine"].image.size == (96, 64)
    # Asking for the version the loaded DiT already runs as reuses it (no second copy of a 25 GB model).
    assert worker.run(plan_item(EditItem("f", cat, "x", {"version": "v1.1"}), defaults)).error is None
    assert len(worker._pipelines) == 1


def _thin_image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 8), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_model_that_cannot_load_stops_the_run(manifest, tiny_models, tmp_path, capsys):
    code = main(["--models-dir", str(tiny_models), "--dit", str(tiny_models / "vae" / VAE),
                 "--manifest", str(manifest), "--out", str(tmp_path), *EDIT, "--quiet"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and error.startswith("step1x-edit-batch: error: cannot load the models: ")
    assert "not a Step1X-Edit DiT" in error
    assert main(["--tiny", "--workers", "2", "--manifest", str(manifest), "--out", str(tmp_path)]) == 2
    assert "add --ray" in capsys.readouterr().err


def test_a_v12_item_that_thinks_and_reflects_records_what_they_did(tiny_models):
    from step1x_core.batch.manifest import EditItem
    from step1x_core.batch.plan import RunDefaults, plan_item
    from step1x_core.batch.worker import EditWorker, ModelFiles, Outcome
    from step1x_core.pipeline import EditSettings
    from step1x_core.release_files import find_in_models_dir

    settings = EditSettings(steps=1, size_level=64, judge_tries=1, reasoning_tokens=4)
    defaults = RunDefaults(settings, find_in_models_dir(tiny_models, "dit", "v1.2"))
    worker = EditWorker(ModelFiles(str(find_in_models_dir(tiny_models, "vae")),
                                   str(find_in_models_dir(tiny_models, "text_encoder", "v1.2")),
                                   {"device": "cpu", "reasoning": True}))
    outcome = worker.run(plan_item(EditItem("r", str(CAT), "add a red hat", {"think": True, "reflect": 2}), defaults))
    assert outcome.error is None and outcome.image.size == (96, 64)
    record = outcome.reasoning
    assert isinstance(record["instruction_used"], str) and 1 <= record["rounds"] <= 2
    assert 0 <= record["chosen_round"] < record["rounds"] and len(record["scores"]) == record["rounds"]
    assert "round 1" in record["log"].lower()
    assert Outcome.from_row(outcome.to_row()).reasoning == record  # the same through a Ray row
    plain = worker.run(plan_item(EditItem("p", str(CAT), "add a red hat"), defaults))
    assert plain.error is None and plain.reasoning is None
