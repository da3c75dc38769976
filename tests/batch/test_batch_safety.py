"""A batch never loses or overwrites a user's file: outputs that would replace an input image or a file the
batch did not write, ids that cannot be file names, CSV rows a stray quote would swallow, empty manifests.
No model is loaded here: the worker is a stand-in that "edits" by returning a small image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from step1x_core.batch import runner
from step1x_core.batch.manifest import EditItem, ManifestError, file_name_problem, read_manifest
from step1x_core.batch.plan import RunDefaults
from step1x_core.batch.results import ResultsLog
from step1x_core.batch.runner import run_batch
from step1x_core.batch.worker import ModelFiles, Outcome
from step1x_core.commands.batch import main
from step1x_core.pipeline import EditSettings
from tests.batch.files import read_results

NO_MODELS = ModelFiles("no-vae.safetensors", "no-qwen")


class FakeWorker:
    """Stands in for EditWorker: records what it was asked to edit and returns a small image."""

    edited: list[str] = []

    def __init__(self, files):
        pass

    def run(self, plan):
        FakeWorker.edited.append(plan.item.id)
        return Outcome(plan.item.id, image=Image.new("RGB", (8, 8), (1, 2, 3)), seconds=0.0)


@pytest.fixture
def fake_worker(monkeypatch):
    FakeWorker.edited = []
    monkeypatch.setattr(runner, "EditWorker", FakeWorker)
    return FakeWorker


def _defaults(tmp_path: Path) -> RunDefaults:
    return RunDefaults(EditSettings(steps=1, size_level=64), tmp_path / "dit.safetensors")


def _photo(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 100, 50)).save(path)
    return path.read_bytes()


# ---- 1. outputs never replace an input image or a file the batch did not write -------------------------

def test_an_output_that_is_an_input_image_is_refused_and_the_rest_run(tmp_path, fake_worker):
    folder = tmp_path / "photos"
    cat = _photo(folder / "cat.png")
    dog = _photo(folder / "dog.png")
    items = [EditItem("cat", str(folder / "cat.png"), "add a hat"),  # OUT/cat.png would be its own photo
             EditItem("dog2", str(folder / "cat.png"), "x"),
             EditItem("dog", str(tmp_path / "elsewhere.png"), "x"),  # OUT/dog.png is another item's input
             EditItem("bird", str(folder / "dog.png"), "x")]
    summary = run_batch(items, _defaults(tmp_path), NO_MODELS, folder, progress=False)
    assert (folder / "cat.png").read_bytes() == cat and (folder / "dog.png").read_bytes() == dog
    assert fake_worker.edited == ["dog2", "bird"]
    results = read_results(folder)
    assert (summary.ok, summary.errors) == (2, 2)
    assert results["cat"]["status"] == "error" and "'cat'" in results["cat"]["error"]
    assert str(folder / "cat.png") in results["cat"]["error"] and "the input image of 'cat', 'dog2'" in results["cat"]["error"]
    assert "the input image of 'bird'" in results["dog"]["error"] and str(folder / "dog.png") in results["dog"]["error"]


def test_an_existing_file_the_batch_did_not_write_is_kept(tmp_path, fake_worker):
    out = tmp_path / "out"
    mine = _photo(out / "a.png")
    items = [EditItem("a", str(tmp_path / "in.png"), "x"), EditItem("b", str(tmp_path / "in.png"), "x")]
    run_batch(items, _defaults(tmp_path), NO_MODELS, out, progress=False)
    assert (out / "a.png").read_bytes() == mine and fake_worker.edited == ["b"]
    error = read_results(out)["a"]["error"]
    assert str(out / "a.png") in error and "did not write it" in error


def test_its_own_outputs_are_still_replaced_when_settings_change_or_after_a_failure(tmp_path, fake_worker,
                                                                                     monkeypatch):
    out = tmp_path / "out"
    item = EditItem("a", str(tmp_path / "in.png"), "x")
    run_batch([item], _defaults(tmp_path), NO_MODELS, out, progress=False)
    assert fake_worker.edited == ["a"] and read_results(out)["a"]["status"] == "ok"
    run_batch([item], _defaults(tmp_path), NO_MODELS, out, progress=False)
    assert fake_worker.edited == ["a"]  # resumed: done before
    changed = EditItem("a", str(tmp_path / "in.png"), "y")
    monkeypatch.setattr(FakeWorker, "run", lambda self, plan: Outcome(plan.item.id, error="boom"))
    run_batch([changed], _defaults(tmp_path), NO_MODELS, out, progress=False)
    assert read_results(out)["a"]["status"] == "error" and read_results(out)["a"]["earlier_output"] == "a.png"
    monkeypatch.undo()
    monkeypatch.setattr(runner, "EditWorker", FakeWorker)
    summary = run_batch([changed], _defaults(tmp_path), NO_MODELS, out, progress=False)
    assert summary.ok == 1 and fake_worker.edited == ["a", "a"]  # its own PNG, replaced


# ---- 2. ids that cannot be file names are the item's own error --------------------------------------

@pytest.mark.parametrize("bad", ["x" * 300, "CON", "nul", "shop/com1", "aux.final", "a<b", 'say "hi"', "a:b",
                                 "a|b", "a?", "a*", "a\\b", "trailing.", "trailing ", "shop /b"])
def test_ids_that_cannot_be_file_names_fail_alone_before_models_load(tmp_path, fake_worker, bad):
    assert file_name_problem(bad)
    items = [EditItem("ok1", str(tmp_path / "in.png"), "x"), EditItem(bad, str(tmp_path / "in.png"), "x"),
             EditItem("ok2", str(tmp_path / "in.png"), "x")]
    summary = run_batch(items, _defaults(tmp_path), NO_MODELS, tmp_path / "out", progress=False)
    assert fake_worker.edited == ["ok1", "ok2"] and (summary.ok, summary.errors) == (2, 1)
    record = read_results(tmp_path / "out")[bad]
    assert record["status"] == "error" and repr(bad[:60]) in record["error"]
    assert "cannot name its output file" in record["error"]


def test_a_manifest_with_such_ids_is_read(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text("".join(json.dumps({"id": i, "image": "c.png", "instruction": "x"}) + "\n"
                            for i in ["x" * 300, "CON", "a:b", "ok"]), encoding="utf-8")
    assert [i.id for i in read_manifest(path)] == ["x" * 300, "CON", "a:b", "ok"]


@pytest.mark.parametrize("good", ["a", "shop/b", "x" * 229, "con2", "comma,ok", "über-größe", "a b"])
def test_ordinary_ids_are_file_names(good):
    assert file_name_problem(good) is None


# ---- 3. CSV: a stray quote never swallows rows ------------------------------------------------------

@pytest.mark.parametrize("rows, line, fragment", [
    (['a,cat.png,"12" tall', "b,cat.png,x"], 2, "cannot be read as CSV"),  # quote closed mid-field
    (['a,cat.png,x', 'b,cat.png,"make it 12 tall', "c,cat.png,x", "d,cat.png,y"], 3, "is never closed"),
    (['a,cat.png,"make it 12 tall', "b,cat.png,x", 'c,cat.png,"y"'], 2, "stray"),
    (['a,cat.png,"make it 12 tall', 'b,cat.png,x"', "c,cat.png,y"], 2, "runs on to line 3"),  # spans lines
    (["a,cat.png,x,extra"], 2, "4 fields, but the header has 3"),
    (["a,cat.png"], 2, "2 fields, but the header has 3"),
])
def test_a_broken_csv_row_is_named_with_its_line(tmp_path, rows, line, fragment):
    path = tmp_path / "edits.csv"
    path.write_text("id,image,instruction\n" + "\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert f"edits.csv line {line}:" in str(err.value) and fragment in str(err.value)
    assert '"make it 12"" tall"' in str(err.value) or "fields" in fragment


def test_csv_quotes_inside_and_quoted_fields_still_read(tmp_path):
    path = tmp_path / "edits.csv"
    path.write_text('id,image,instruction\na,cat.png,make it 12" tall\nb,cat.png,"make it 12"" tall, please"\n',
                    encoding="utf-8")
    assert [i.instruction for i in read_manifest(path)] == ['make it 12" tall', 'make it 12" tall, please']


def test_a_csv_field_of_any_size_reads(tmp_path):
    path = tmp_path / "edits.csv"
    long = "add a hat " * 30_000  # 300 000 characters, over csv's default 131 072
    path.write_text(f'id,image,instruction\na,cat.png,"{long}"\n', encoding="utf-8")
    assert read_manifest(path)[0].instruction == long


# ---- 4. an empty manifest says so ------------------------------------------------------------------

@pytest.mark.parametrize("name, text", [("e.csv", ""), ("e.csv", "id,image,instruction\n"), ("e.jsonl", ""),
                                        ("e.jsonl", "\n\n")])
def test_an_empty_manifest_is_an_error(tmp_path, capsys, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError, match="the manifest is empty"):
        read_manifest(path)
    assert main(["--tiny", "--manifest", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr()
    assert "the manifest is empty" in err.err and "results.jsonl" not in err.out
    assert not (tmp_path / "out").exists()


def test_results_log_knows_what_it_wrote(tmp_path):
    log = ResultsLog(tmp_path)
    assert not log.wrote("a")
    log.journal.append({"id": "a", "status": "ok", "output": "a.png"})
    log.journal.append({"id": "b", "status": "error", "output": None})
    assert log.wrote("a") and not log.wrote("b")
