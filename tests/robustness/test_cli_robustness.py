"""The step1x-edit command with bad arguments, bad files and interruptions: exit non-zero with one line on
stderr, and never leave a half-written (or half-replaced) PNG.

Already covered elsewhere (tests/commands/test_cli.py): a missing image, a missing --dit, --size-level 4, --steps 0,
no models given, a VAE given as the DiT, a failing PNG writer leaving no file.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from step1x_core.images import writing as outputs
from step1x_core.commands import cli
from step1x_core.commands.cli import main, save_png_atomically
from tests.golden import REPO_ROOT
from tests.robustness.helpers import CAT, gradient
from tests.release_names import VAE

QUICK = ["--size-level", "32", "--steps", "1", "--cfg", "1", "--quiet"]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("step1x-edit: error:"), stderr
    return lines[0]


def _argv(tiny_models, out, *extra) -> list[str]:
    return ["--models-dir", str(tiny_models), "--image", str(CAT), "--instruction", "x", "--output", str(out), *extra]


# ---- bad arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["--image", str(CAT)], "the following arguments are required: --instruction, --output"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--resample", "box"], "argument --resample: invalid choice: 'box'"),
    (["--seed", "-1"], "argument --seed: must be between 0 and 2**64 - 1"),
    (["--seed", str(2**64)], "argument --seed: must be between 0 and 2**64 - 1"),
    (["--cfg", "nan"], "argument --cfg: must be a finite number"),
    (["--strength", "inf"], "argument --strength: must be a finite number"),
    (["--device", "banana"], "argument --device: 'banana' is not a device"),
    (["--device", "cuda"], "argument --device: cuda: this PyTorch"),  # a CPU-only machine
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, tmp_path, args, fragment):
    if fragment.startswith("argument --device: cuda") and cli.torch.cuda.is_available():
        fragment = "argument --device"  # on a GPU machine --device cuda is fine: use banana's rule instead
        args = ["--device", "cuda:99"]
    full = args if args[0] == "--image" and len(args) == 2 else \
        ["--image", str(CAT), "--instruction", "x", "--output", str(tmp_path / "o.png"), *args]
    with pytest.raises(SystemExit) as info:
        main(full)
    assert info.value.code == 2
    assert fragment in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o.png").exists()


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "--size-level" in capsys.readouterr().out


@pytest.mark.slow
def test_usage_error_from_the_real_command_is_one_line():
    result = subprocess.run([sys.executable, "-m", "step1x_core.commands.cli", "--steps", "x"], capture_output=True,
                            text=True, cwd=REPO_ROOT)
    assert result.returncode == 2
    _one_error_line(result.stderr)


# ---- missing and bad files ----------------------------------------------------------------------------


def _bad_inputs(tmp_path, tiny_models) -> dict:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    half = tmp_path / "half.png"
    full = CAT.read_bytes()
    half.write_bytes(full[: len(full) // 2])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20000, 20000))
    strip = tmp_path / "strip.png"
    gradient(1010, 10).save(strip)
    models = str(tiny_models)
    return {
        "image is a folder": (["--image", str(folder)], "is a folder"),
        "image is text": (["--image", str(text)], "notes.png: cannot be read as an image; it is a text file"),
        "image is truncated": (["--image", str(half)], "truncated"),
        "image is a decompression bomb": (["--image", str(bomb)], "Downscale the image first"),
        "image is 101:1": (["--image", str(strip)], "aspect ratio of a 1010x10 image (101:1) is too extreme"),
        "output is a jpg": (["--output", str(tmp_path / "o.jpg")], "ending in .png"),
        "models dir missing": (["--models-dir", str(tmp_path / "nowhere")], "no dit model under"),
        "qwen folder missing": (["--models-dir", models, "--qwen", str(tmp_path / "qwen")], "--qwen"),
        "vae missing": (["--models-dir", models, "--vae", str(tmp_path / VAE)], "--vae"),
        "size level too big": (["--size-level", "100000"], "size_level must be between 16 and 4096"),
    }


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_bad_files_are_one_line_and_exit_2(capsys, tmp_path, tiny_models, verbose):
    """Nothing is loaded before every path is checked, so even without --quiet one line is all there is."""
    for case, (args, fragment) in _bad_inputs(tmp_path, tiny_models).items():
        out = tmp_path / "out.png"
        argv = _argv(tiny_models, out, "--steps", "1", *([] if verbose else ["--quiet"])) + args
        assert main(argv) == 2, case
        assert fragment in _one_error_line(capsys.readouterr().err), case
        assert not out.exists(), case


def test_output_folder_is_refused_before_editing(capsys, tmp_path, tiny_models):
    folder = tmp_path / "result.png"
    folder.mkdir()
    assert main(_argv(tiny_models, folder, *QUICK)) == 2
    assert "is a folder" in _one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_missing_image_from_the_real_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "step1x_core.commands.cli", "--image", str(tmp_path / "no.png"),
                             "--instruction", "x", "--output", str(tmp_path / "o.png"), "--tiny"],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 2 and "input image not found" in _one_error_line(result.stderr)


# ---- unusual but valid inputs -------------------------------------------------------------------------


@pytest.mark.slow
def test_unusual_image_files_edit(tmp_path, tiny_models):
    rgba = tmp_path / "rgba.png"
    gradient(40, 30, "RGBA").save(rgba)
    rotated = tmp_path / "rotated.jpg"
    image = gradient(96, 64)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(rotated, exif=exif)
    for path, size in ((rgba, (40, 30)), (rotated, (64, 96))):
        out = tmp_path / f"{path.stem}-out.png"
        assert main(["--models-dir", str(tiny_models), "--image", str(path), "--instruction", "", "--output",
                     str(out), *QUICK]) == 0
        assert Image.open(out).size == size


# ---- interruptions and atomic writes ------------------------------------------------------------------


def test_interrupt_mid_sampling_exits_130_and_keeps_the_old_output(capsys, tmp_path, tiny_models, monkeypatch):
    out = tmp_path / "out.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out)  # the result of an earlier run
    before = out.read_bytes()
    import tqdm

    def interrupt(self, n=1):
        raise KeyboardInterrupt

    monkeypatch.setattr(tqdm.tqdm, "update", interrupt)  # the first finished step
    assert main(_argv(tiny_models, out, "--size-level", "32", "--steps", "3", "--quiet")) == 130
    assert "interrupted; no output written" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary file left


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_failed_save_keeps_the_old_output_and_leaves_no_temporary(tmp_path, error):
    out = tmp_path / "out.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out)
    before = out.read_bytes()

    class Failing:
        def save(self, f, format):
            gradient(64, 64).save(f, format=format)
            f.flush()
            raise error

    with pytest.raises(error):
        save_png_atomically(Failing(), out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_output_is_never_seen_half_written(tmp_path, monkeypatch):
    """Until the rename, the target holds the old file; after it, the complete new one."""
    out = tmp_path / "out.png"
    Image.new("RGB", (8, 8)).save(out)
    seen = []
    real_replace = outputs.os.replace

    def replace(src, dst):
        seen.append(Image.open(dst).size)  # the old file, intact, while the new one is complete beside it
        Image.open(src).verify()
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    save_png_atomically(gradient(64, 48), out)
    assert seen == [(8, 8)] and Image.open(out).size == (64, 48)
