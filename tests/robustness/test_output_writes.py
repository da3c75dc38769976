"""Where the command line writes the edit: the destination is checked before any model loads (a folder, the
input image itself, a folder that cannot be written), and a save stopped by Ctrl-C or SIGTERM leaves the old
file as it was and no temporary file.

(Inside ComfyUI, files are written by ComfyUI's own SaveImage node; the pack writes none.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from step1x_core.commands.cli import main
from tests.golden import REPO_ROOT
from tests.robustness.helpers import CAT, gradient, one_error_line

QUICK = ["--size-level", "32", "--steps", "1", "--cfg", "1", "--quiet"]
# The command in its own process, as users run it (with the test machines' torchvision shim, as in conftest).
CLI = ("import sys; from tests import cpu_torchvision; cpu_torchvision.apply(); "
       "from step1x_core.commands.cli import main; sys.exit(main(sys.argv[1:]))")


def _argv(tiny_models, image: Path, out: Path, *extra: str) -> list[str]:
    return ["--models-dir", str(tiny_models), "--image", str(image), "--instruction", "x", "--output", str(out),
            *QUICK, *extra]


@pytest.fixture
def broken_dit(tmp_path) -> Path:
    """An empty DiT file: a check that ran after loading would report it instead of the output's problem."""
    path = tmp_path / "empty-dit.safetensors"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("spelling", ["same", "dotted", "hard-link"])
def test_output_that_is_the_input_is_refused_before_loading(capsys, tmp_path, tiny_models, broken_dit, spelling):
    image = tmp_path / "photo.png"
    shutil.copy(CAT, image)
    before = image.read_bytes()
    out = {"same": image, "dotted": tmp_path / "sub" / ".." / "photo.png", "hard-link": tmp_path / "link.png"}[spelling]
    (tmp_path / "sub").mkdir()
    if spelling == "hard-link":
        os.link(image, out)
    assert main(_argv(tiny_models, image, out, "--dit", str(broken_dit))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "is the input image" in line and "another file name" in line, line
    assert image.read_bytes() == before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write read-only files")
def test_read_only_output_file_is_refused_before_loading(capsys, tmp_path, tiny_models, broken_dit):
    out = tmp_path / "keep.png"
    Image.new("RGB", (8, 8)).save(out)
    out.chmod(0o444)
    assert main(_argv(tiny_models, CAT, out, "--dit", str(broken_dit))) == 2
    assert "is read-only" in one_error_line(capsys.readouterr().err)
    assert Image.open(out).size == (8, 8)


def test_output_under_a_file_is_refused_before_loading(capsys, tmp_path, tiny_models, broken_dit):
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder should be")
    assert main(_argv(tiny_models, CAT, blocker / "out.png", "--dit", str(broken_dit))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{blocker} is a file, not a folder" in line, line


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder this process cannot create files in: a read-only one, or (as root, whom permissions do not
    stop) Linux's /sys, where even root cannot create files."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    folder = Path("/sys")
    try:
        os.close(os.open(folder / "step1x-probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(folder / "step1x-probe")
    except OSError:
        yield folder
        return
    pytest.skip("no folder this process cannot write to (running as root without a read-only /sys)")


def test_unwritable_output_folder_is_refused_before_loading(capsys, tiny_models, broken_dit, unwritable_folder):
    out = unwritable_folder / "out.png"
    assert main(_argv(tiny_models, CAT, out, "--dit", str(broken_dit))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--output {out}: cannot write in {unwritable_folder}" in line, line


def test_failed_write_is_named_by_the_output_not_the_temporary(capsys, tmp_path, tiny_models, monkeypatch):
    """The folder turns read-only between the up-front check and the save (a full or remounted disk): the
    message names the output, not the hidden temporary file, and nothing is left behind."""
    import step1x_core.commands.cli as cli

    out = tmp_path / "out.png"
    real_open, real_check = os.open, cli.check_paths

    def read_only(path, flags, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    def check_then_fail_writes(args):
        paths = real_check(args)
        monkeypatch.setattr(os, "open", read_only)
        return paths

    monkeypatch.setattr(cli, "check_paths", check_then_fail_writes)
    assert main(_argv(tiny_models, CAT, out)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write {out}: Read-only file system" in line and ".tmp" not in line, line
    assert list(tmp_path.iterdir()) == []


# ---- signals during the save ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_input(tmp_path_factory) -> Path:
    """A 7000x7000 photo: the edit is restored to that size, so its PNG takes about a second to write."""
    path = tmp_path_factory.mktemp("large") / "large.jpg"
    gradient(7000, 7000).save(path, quality=80)
    return path


def _stop_during_save(tmp_path: Path, tiny_models: Path, image: Path, signum: int) -> subprocess.CompletedProcess:
    out = tmp_path / "out.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out)  # the result of an earlier run
    process = subprocess.Popen([sys.executable, "-c", CLI, *_argv(tiny_models, image, out)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
            process.send_signal(signum)
            break
        time.sleep(0.002)
    else:
        process.kill()
        pytest.fail("the save never started, or the run ended before it could be interrupted")
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum, code, said", [(signal.SIGTERM, 143, "stopped by SIGTERM"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_signal_during_the_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, tiny_models, large_input,
                                                                             signum, code, said):
    result = _stop_during_save(tmp_path, tiny_models, large_input, signum)
    assert result.returncode == code, result.stderr
    assert f"{said}; no output written" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"], "a temporary file was left behind"
    assert Image.open(tmp_path / "out.png").size == (8, 8)  # the earlier result, intact
