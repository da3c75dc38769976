"""Every size and count option has an upper bound, checked before any model loads (and before the model
files are even looked for), and an allocation that fails anywhere ends every command with exit 3 and the
README's one line, never a traceback. The allocation failures are real: the command runs in a process
whose address space is capped (RLIMIT_AS) and is asked for an edit larger than the cap allows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.golden import REPO_ROOT

CAT = REPO_ROOT / "tests" / "data" / "cat.png"
OUT_OF_MEMORY = "error: out of memory; try --size-level 512, --weight-dtype float8_e4m3fn or --offload"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
NO_MODELS = ["--models-dir", "no-such-models-folder"]

# Runs a command's module as its entry point would, with the address space capped at what the process
# uses after its imports plus argv[2] MiB: the tiny models load and edit at size level 64 in that, while
# an edit at size level 2048 asks the VAE for a 2 GB activation.
CAPPED = """
import resource, runpy, sys
from tests import cpu_torchvision
cpu_torchvision.apply()
import datasets, torch, transformers, step1x_core.pipeline  # noqa: F401 - imported before the cap
import step1x_core.commands.batch, step1x_core.commands.cli, step1x_core.commands.gedit  # noqa: F401, E401
def size():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
module, extra = sys.argv[1], int(sys.argv[2]) << 20
resource.setrlimit(resource.RLIMIT_AS, (size() + extra, resource.RLIM_INFINITY))
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
CAP_MIB = "1500"
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and caps RLIMIT_AS (Linux)")


def _run(module: str, *args, cap: str | None = None) -> subprocess.CompletedProcess:
    command = ([sys.executable, "-c", CAPPED, module, cap] if cap else [sys.executable, "-m", module])
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT, env=ENV,
                          timeout=600)


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines and "Traceback" not in result.stderr, result.stderr
    return lines[-1]


# ---- bounds, before anything loads -----------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--width", "100000"], "argument --width: must be between 16 and 4096 pixels"),
    (["--height", "8"], "argument --height: must be between 16 and 4096 pixels"),
    (["--image", CAT, "--reflect", "1000"],
     "reflect must be between 0 (off) and 10 rounds (the reference: 3), got 1000"),
    (["--image", CAT, "--steps", "100000"], "steps must be between 1 and 1000"),
    (["--image", CAT, "--size-level", "100000"], "size_level must be between 16 and 4096"),
], ids=["width", "height", "reflect", "steps", "size-level"])
def test_sizes_and_counts_are_bounded_before_any_model_is_looked_for(tmp_path, args, fragment):
    result = _run("step1x_core.commands.cli", "--instruction", "x", "--output", tmp_path / "o.png", *NO_MODELS, *args)
    assert result.returncode == 2
    line = _one_line(result)
    assert line.startswith("step1x-edit: error: ") and fragment in line, line
    assert not (tmp_path / "o.png").exists()


def test_batch_worker_counts_are_bounded(tmp_path, capsys):
    from step1x_core.commands.batch import main

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "image": str(CAT), "instruction": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as stop:
        main(["--manifest", str(manifest), "--out", str(tmp_path / "out"), "--tiny", "--ray", "--workers", "100000"])
    assert stop.value.code == 2 and "--workers: must be at most 1024" in capsys.readouterr().err
    too_many = str((os.cpu_count() or 1) + 1)
    assert main(["--manifest", str(manifest), "--out", str(tmp_path / "out"), "--tiny", "--ray", "--workers",
                 too_many]) == 2
    assert f"this machine has {os.cpu_count()} CPUs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_the_judges_answer_length_is_bounded(tmp_path, capsys):
    from step1x_core.commands.gedit import main

    with pytest.raises(SystemExit) as stop:
        main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--judge-max-tokens", "1000000"])
    assert stop.value.code == 2 and "--judge-max-tokens: must be at most 8192" in capsys.readouterr().err


# ---- out of memory: exit 3 and one line, from every command --------------------------------------------

@pytest.mark.slow
def test_step1x_edit_out_of_memory_exits_3(tmp_path):
    common = ["--tiny", "--image", CAT, "--instruction", "x", "--steps", "1", "--quiet"]
    fits = _run("step1x_core.commands.cli", *common, "--size-level", "64", "--output", tmp_path / "small.png",
                cap=CAP_MIB)
    assert fits.returncode == 0, fits.stderr  # the cap leaves room for the run itself
    result = _run("step1x_core.commands.cli", *common, "--size-level", "2048", "--output", tmp_path / "big.png",
                  cap=CAP_MIB)
    assert result.returncode == 3 and _one_line(result) == f"step1x-edit: {OUT_OF_MEMORY}"
    assert not (tmp_path / "big.png").exists()


@pytest.mark.slow
def test_a_batch_item_out_of_memory_is_recorded_the_rest_run_and_the_run_exits_3(tmp_path):
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "big", "image": str(CAT), "instruction": "x", "size_level": 2048},
            {"id": "small", "image": str(CAT), "instruction": "x"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    result = _run("step1x_core.batch", "--tiny", "--manifest", manifest, "--out", out, "--size-level", "64",
                  "--steps", "1", "--quiet", cap=CAP_MIB)
    assert result.returncode == 3
    assert _one_line(result) == (f"step1x-edit-batch: {OUT_OF_MEMORY} (1 item(s) ran out of memory; see "
                                 "results.jsonl)")
    records = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text(encoding="utf-8").splitlines())}
    assert records["small"]["status"] == "ok"
    assert records["big"]["error"].startswith("out of memory at size level 2048; try a lower size_level")
    assert not (out / ".step1x-edit.lock").exists()


@pytest.mark.slow
def test_a_batch_whose_models_do_not_fit_exits_3(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "image": str(CAT), "instruction": "x"}) + "\n", encoding="utf-8")
    result = _run("step1x_core.batch", "--tiny", "--manifest", manifest, "--out", tmp_path / "out", "--quiet",
                  cap="1")  # not even the tiny models fit in one more MiB
    assert result.returncode == 3 and _one_line(result) == f"step1x-edit-batch: {OUT_OF_MEMORY}"


@pytest.mark.slow
def test_gedit_out_of_memory_exits_3(tmp_path):
    pytest.importorskip("datasets")
    from step1x_core.testing.gedit_data import write_tiny_gedit

    data = write_tiny_gedit(tmp_path / "GEdit-Bench", task_types=("background_change",), languages=("en",),
                            per_task=1, layout="parquet")
    result = _run("step1x_core.gedit", "--data", data, "--out", tmp_path / "out", "--tiny", "--stage", "edit",
                  "--size-level", "2048", "--steps", "1", "--quiet", cap=CAP_MIB)
    assert result.returncode == 3
    assert _one_line(result).startswith(f"step1x-edit-gedit: {OUT_OF_MEMORY} (1 item(s)")


def test_allocation_failures_are_recognised_by_what_the_allocators_say():
    import torch

    from step1x_core.memory import is_out_of_memory

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 2126512128 bytes. Error code 12 (Cannot allocate memory)")
    wrapped = ValueError("while loading")
    wrapped.__cause__ = MemoryError()
    mapping = OSError(12, "Cannot allocate memory")
    assert all(map(is_out_of_memory, [cpu, MemoryError(), torch.OutOfMemoryError("CUDA out of memory."),
                                      RuntimeError("MPS backend out of memory"), wrapped, mapping]))
    assert not any(map(is_out_of_memory, [RuntimeError("shape mismatch"), ValueError("memory format"), None]))
