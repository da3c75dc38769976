"""Resume after the worst stops and changes: a run killed with SIGKILL in the middle of a save (its
temporary file is removed by the next run, nobody else's), killed between its PNG and its results line
(the next run edits that item again instead of refusing its own PNG), and an input image replaced at the
same path (edited again; a file merely touched is not). Real tiny-model runs; the kills are real SIGKILLs,
sent from inside the run at the exact moment."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from step1x_core.commands.batch import main
from step1x_core.images.writing import remove_leftover_temporaries
from tests.golden import REPO_ROOT
from tests.batch.files import CAT, cat_manifest, read_results

TINY = ["--tiny", "--size-level", "64", "--steps", "1", "--quiet"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
# The batch entry point, with a real SIGKILL sent to itself at a chosen moment (argv[1]): "rename" when the
# first PNG is about to be renamed into place, "line" just before the first item's ok line is appended.
KILLED = """
import os, signal, sys
from tests import cpu_torchvision
cpu_torchvision.apply()
from step1x_core.batch import journal
from step1x_core.commands.batch import main
moment = sys.argv.pop(1)
if moment == "rename":
    replace = os.replace
    def killing_replace(src, dst):
        if str(dst).endswith(".png"):
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst)
    os.replace = killing_replace
else:
    append = journal.Journal.append
    def killing_append(self, record):
        if record.get("status") == "ok":
            os.kill(os.getpid(), signal.SIGKILL)
        return append(self, record)
    journal.Journal.append = killing_append
sys.exit(main(sys.argv[1:]))
"""


def _killed_run(moment: str, manifest: Path, out: Path) -> None:
    run = subprocess.run([sys.executable, "-c", KILLED, moment, "--manifest", str(manifest), "--out", str(out),
                          *TINY], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr


@pytest.mark.slow  # a killed process, and runs of the tiny models
def test_a_save_killed_midway_leaves_a_temporary_file_the_next_run_removes(tmp_path, capsys):
    manifest = cat_manifest(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out"
    _killed_run("rename", manifest, out)
    leftovers = list(out.glob(".a.png.*.tmp"))
    assert len(leftovers) == 1 and not (out / "a.png").exists()
    # Files that only look alike are not ours, or not dead: they stay.
    others = [out / ".notes.tmp", out / ".a.png.12.not-hex.tmp", out / f".b.png.{os.getpid()}.0123abcd.tmp"]
    for path in others:
        path.write_bytes(b"keep me")
    assert main(["--manifest", str(manifest), "--out", str(out), *TINY]) == 0
    assert not leftovers[0].exists()
    assert all(path.read_bytes() == b"keep me" for path in others)
    assert {i: r["status"] for i, r in read_results(out).items()} == {"a": "ok", "b": "ok"}


def test_only_dead_processes_temporaries_in_sub_folders_too_are_removed(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    (tmp_path / "shop").mkdir()
    gone = tmp_path / "shop" / f".b.png.{dead}.89abcdef.tmp"
    alive = tmp_path / f".c.png.{os.getpid()}.89abcdef.tmp"
    for path in (gone, alive):
        path.write_bytes(b"x")
    assert remove_leftover_temporaries(tmp_path) == [gone]
    assert alive.exists()


@pytest.mark.slow  # a killed process, and runs of the tiny models
def test_a_run_killed_between_a_png_and_its_line_resumes_that_item(tmp_path):
    manifest = cat_manifest(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out"
    _killed_run("line", manifest, out)
    assert (out / "a.png").is_file()  # renamed into place; its ok line never written
    assert main(["--manifest", str(manifest), "--out", str(out), *TINY]) == 0
    results = read_results(out)
    assert {i: r["status"] for i, r in results.items()} == {"a": "ok", "b": "ok"}
    assert results["a"]["output"] == "a.png"


@pytest.mark.slow  # a killed process, and runs of the tiny models
def test_an_input_replaced_at_the_same_path_is_edited_again(tmp_path, capsys):
    manifest = cat_manifest(tmp_path / "in", ["a"])
    out = tmp_path / "out"
    args = ["--manifest", str(manifest), "--out", str(out), *TINY[:-1]]
    assert main(args) == 0
    first = read_results(out)["a"]
    assert first["image_file"]["size"] == (tmp_path / "in" / "cat.png").stat().st_size
    stamp = (out / "a.png").stat().st_mtime_ns

    os.utime(tmp_path / "in" / "cat.png")  # touched, same content: still done
    assert main(args) == 0 and "1 done before, 0 run now" in capsys.readouterr().out
    assert (out / "a.png").stat().st_mtime_ns == stamp

    Image.open(CAT).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "in" / "cat.png")
    assert main(args) == 0 and "0 done before, 1 run now" in capsys.readouterr().out
    assert (out / "a.png").stat().st_mtime_ns != stamp
    assert read_results(out)["a"]["image_file"]["sha256"] != first["image_file"]["sha256"]
