"""A batch never loses or overwrites a user's file: CSV rows a stray quote would swallow, empty manifests.
No model is loaded here."""

from __future__ import annotations

import pytest

from step1x_core.batch.manifest import ManifestError, read_manifest
from step1x_core.commands.batch import main

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
