"""A batch never loses or overwrites a user's file: ids that cannot be file names, CSV rows a stray quote would
swallow, empty manifests.
No model is loaded here: the worker is a stand-in that "edits" by returning a small image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from step1x_core.batch import runner
from step1x_core.batch.manifest import EditItem, ManifestError, file_name_problem, read_manifest
from step1x_core.batch.plan import RunDefaults
from step1x_core.batch.runner import run_batch
from step1x_core.batch.worker import ModelFiles, Outcome
from step1x_core.commands.batch import main
from step1x_core.pipeline import EditSettings

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


def _results(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text(encoding="utf-8").splitlines())}


# ---- ids that cannot be file names are the item's own error --------------------------------------

@pytest.mark.parametrize("bad", ["x" * 300, "CON", "nul", "shop/com1", "aux.final", "a<b", 'say "hi"', "a:b",
                                 "a|b", "a?", "a*", "a\\b", "trailing.", "trailing ", "shop /b"])
def test_ids_that_cannot_be_file_names_fail_alone_before_models_load(tmp_path, fake_worker, bad):
    assert file_name_problem(bad)
    items = [EditItem("ok1", str(tmp_path / "in.png"), "x"), EditItem(bad, str(tmp_path / "in.png"), "x"),
             EditItem("ok2", str(tmp_path / "in.png"), "x")]
    summary = run_batch(items, _defaults(tmp_path), NO_MODELS, tmp_path / "out", progress=False)
    assert fake_worker.edited == ["ok1", "ok2"] and (summary.ok, summary.errors) == (2, 1)
    record = _results(tmp_path / "out")[bad]
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


# ---- CSV: a stray quote never swallows rows ------------------------------------------------------

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


# ---- an empty manifest says so ------------------------------------------------------------------

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
