"""The step1x-edit command: end to end on tiny models, one-line errors, atomic output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from step1x_core.commands.cli import main, save_png_atomically
from tests.golden import REPO_ROOT
from tests.release_names import QWEN_FOLDER, V10_DIT, VAE

CAT = REPO_ROOT / "tests" / "data" / "cat.png"


def _cli(*args, env_models=None):
    return subprocess.run([sys.executable, "-m", "step1x_core.commands.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO_ROOT)


@pytest.mark.slow
def test_edit_from_models_dir(tiny_models, tmp_path):
    out = tmp_path / "out.png"
    code = main(["--models-dir", str(tiny_models), "--image", str(CAT), "--instruction", "add a red hat",
                 "--output", str(out), "--size-level", "64", "--steps", "2", "--quiet"])
    assert code == 0
    assert Image.open(out).size == Image.open(CAT).size
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left behind
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # normal permissions, not mkstemp's private 0600


@pytest.mark.slow
def test_explicit_paths_and_version_override(tiny_models, tmp_path):
    out = tmp_path / "out.png"
    code = main(["--dit", str(tiny_models / "diffusion_models" / V10_DIT),
                 "--vae", str(tiny_models / "vae" / VAE),
                 "--qwen", str(tiny_models / "text_encoders" / QWEN_FOLDER),
                 "--version", "v1.0", "--image", str(CAT), "--instruction", "x", "--output", str(out),
                 "--size-level", "64", "--steps", "1", "--quiet", "--keep-working-size"])
    assert code == 0 and Image.open(out).size == (64, 48)


@pytest.mark.parametrize("args, fragment", [
    (["--image", "missing.png"], "input image not found"),
    (["--dit", "nope.safetensors"], "not found"),
    (["--size-level", "4"], "size_level"),
    (["--steps", "0"], "steps"),
])
@pytest.mark.slow
def test_errors_are_one_line_and_nonzero(tiny_models, tmp_path, args, fragment):
    out = tmp_path / "out.png"
    base = {"--image": str(CAT), "--models-dir": str(tiny_models)}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = [item for pair in base.items() for item in pair]
    result = _cli(*argv, "--instruction", "x", "--output", out, "--quiet")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("step1x-edit: error:") and fragment in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_missing_models_are_explained(tmp_path):
    result = _cli("--image", CAT, "--instruction", "x", "--output", tmp_path / "o.png", "--quiet")
    assert result.returncode == 2 and "--models-dir" in result.stderr


@pytest.mark.slow
def test_wrong_model_file_is_explained(tiny_models, tmp_path):
    result = _cli("--models-dir", tiny_models, "--dit", tiny_models / "vae" / VAE, "--image", CAT,
                  "--instruction", "x", "--output", tmp_path / "o.png", "--quiet")
    assert result.returncode == 2 and "not a Step1X-Edit DiT" in result.stderr and "VAE" in result.stderr


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    class Broken:
        def save(self, f, format):
            f.write(b"half a png")
            raise OSError("disk full")

    target = tmp_path / "out.png"
    with pytest.raises(OSError):
        save_png_atomically(Broken(), target)
    assert list(tmp_path.iterdir()) == []
