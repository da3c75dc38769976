"""One runner per output folder: a second batch run into a folder in use is refused (naming the run that
holds it), a lock left by a killed run is taken over by exactly one of the runs racing for it, and two
real runs started together lose no record. The holders are real processes, killed for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from step1x_core.batch.lock import LOCK_FILE, FolderInUse, OutputLock, pid_alive
from step1x_core.commands.batch import main
from tests.golden import REPO_ROOT
from tests.batch.files import cat_manifest, read_results

TINY = ["--tiny", "--size-level", "64", "--steps", "1", "--quiet"]
# A process that takes the folder's lock, says so, and holds it until killed.
HOLD = ("import sys, time; from step1x_core.batch.lock import OutputLock; OutputLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)")
# The real `python -m step1x_core.batch` entry, after the test machines' torchvision fix (conftest).
ENTRY = ("import runpy, sys; from tests import cpu_torchvision; cpu_torchvision.apply(); "
         "sys.argv = ['step1x-edit-batch', *sys.argv[1:]]; runpy.run_module('step1x_core.batch', run_name='__main__')")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}


def _holder(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO_ROOT, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _stale_lock(folder: Path) -> int:
    """A lock left behind by a run killed with SIGKILL; returns that run's pid."""
    holder = _holder(folder)
    holder.kill()
    holder.wait(timeout=30)
    assert (folder / LOCK_FILE).exists() and not pid_alive(holder.pid)
    return holder.pid


def test_a_run_into_a_folder_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    manifest = cat_manifest(tmp_path / "in", ["a"])
    holder = _holder(out)
    try:
        code = main(["--manifest", str(manifest), "--out", str(out), *TINY])
        error = capsys.readouterr().err.strip()
    finally:
        holder.terminate()
        holder.wait(timeout=30)
    assert code == 2
    assert error.startswith(f"step1x-edit-batch: error: {out} is in use by step1x-edit-batch (pid {holder.pid} on ")
    assert "started 20" in error and "UTC" in error  # the holder's start time
    assert "give another --out folder" in error and f"delete {out / LOCK_FILE}" in error
    assert not (out / "results.jsonl").exists()  # refused before anything ran


@pytest.mark.slow  # processes, and runs of the tiny models
def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    dead = _stale_lock(out)
    manifest = cat_manifest(tmp_path / "in", ["a"])
    assert main(["--manifest", str(manifest), "--out", str(out), *TINY]) == 0
    assert f"took over the lock of step1x-edit-batch (pid {dead} on " in caplog.text
    assert read_results(out)["a"]["status"] == "ok"
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_the_lock_is_released_after_an_error(tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n', encoding="utf-8")
    out.mkdir()
    assert main(["--manifest", str(bad), "--out", str(out), *TINY]) == 2
    assert not (out / LOCK_FILE).exists()
    with OutputLock(out):  # and the folder can be taken again
        assert (out / LOCK_FILE).exists()


def test_a_nested_lock_in_the_same_process_neither_takes_nor_releases(tmp_path):
    with OutputLock(tmp_path, "outer"):
        with OutputLock(tmp_path, "inner"):
            pass
        assert json.loads((tmp_path / LOCK_FILE).read_text())["command"] == "outer"
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_naming_a_reused_pid_is_stale(tmp_path):
    """A pid alive now but started after the lock was written is another process: the lock is stale."""
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename,
                                                  "started": 0, "process_start": "1", "command": "old run"}))
    if not Path(f"/proc/{os.getppid()}/stat").exists():
        pytest.skip("needs /proc to tell a reused pid")
    with OutputLock(tmp_path) as lock:
        assert lock.took_over["command"] == "old run"


RACE = ("import sys, time, pathlib; from step1x_core.batch.lock import OutputLock, FolderInUse\n"
        "go = pathlib.Path(sys.argv[2])\n"
        "while not go.exists(): time.sleep(0.001)\n"
        "try:\n"
        "    lock = OutputLock(sys.argv[1]).acquire()\n"
        "except FolderInUse:\n"
        "    print('refused', flush=True)\n"
        "else:\n"
        "    print('won', flush=True); time.sleep(3); lock.release()\n")


@pytest.mark.slow  # processes, and runs of the tiny models
def test_of_runs_racing_to_take_over_a_stale_lock_exactly_one_wins(tmp_path):
    out = tmp_path / "out"
    _stale_lock(out)
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACE, str(out), str(go)], stdout=subprocess.PIPE, text=True,
                               cwd=REPO_ROOT, env=ENV) for _ in range(8)]
    time.sleep(2)  # every racer has started and is waiting
    go.touch()
    answers = sorted(r.communicate(timeout=60)[0].strip() for r in racers)
    assert answers == ["refused"] * 7 + ["won"], answers
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow  # processes, and runs of the tiny models
def test_two_runs_started_together_into_one_folder_lose_no_record(tmp_path):
    out = tmp_path / "out"
    first = cat_manifest(tmp_path / "one", ["a1", "a2"])
    second = cat_manifest(tmp_path / "two", ["b1", "b2"])
    command = [sys.executable, "-c", ENTRY, "--out", str(out), *TINY]
    runs = [subprocess.Popen([*command, "--manifest", str(m)], cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for m in (first, second)]
    finished = [(r.communicate(timeout=300)[1], r.returncode)[::-1] for r in runs]
    codes = sorted(code for code, _ in finished)
    assert codes in ([0, 0], [0, 2]), finished
    for code, err in finished:
        if code == 2:
            assert "is in use by step1x-edit-batch (pid " in err, err
    for manifest in (first, second):  # the refused run, run again, adds its records to the other's
        again = subprocess.run([*command, "--manifest", str(manifest)], cwd=REPO_ROOT, env=ENV, capture_output=True,
                               text=True, timeout=300)
        assert again.returncode == 0, again.stderr
    results = read_results(out)
    assert sorted(results) == ["a1", "a2", "b1", "b2"] and all(r["status"] == "ok" for r in results.values())
    assert not (out / LOCK_FILE).exists()


def test_the_lock_refuses_in_process_too(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(FolderInUse, match=f"pid {holder.pid} "):
            OutputLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=30)


def test_an_out_that_is_a_file_is_named_not_locked(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a user's file")
    manifest = cat_manifest(tmp_path / "in", ["a"])
    assert main(["--manifest", str(manifest), "--out", str(out), *TINY]) == 2
    assert capsys.readouterr().err.strip() == f"step1x-edit-batch: error: --out {out} is a file; give a folder"
    assert out.read_text() == "a user's file"
