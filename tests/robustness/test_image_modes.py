"""Input images in every Pillow mode the engine accepts, converted to 8-bit RGB at the right scale, and files
Pillow cannot read, named (with the file) as what they seem to be.

The engine's reading (`load_rgb`, `to_rgb`) serves the command line, the Python API and the Image Scale node;
ComfyUI's own Load Image reads files inside ComfyUI, so the unreadable-file cases run through the command line.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from step1x_core.commands.cli import main
from step1x_core.images.reading import load_rgb, to_rgb
from tests.robustness.helpers import one_error_line

RAMP = np.linspace(0.0, 1.0, 48 * 64, dtype=np.float64).reshape(48, 64)  # the picture, as fractions of white
WHITE = 255


def _grey(fraction: np.ndarray) -> np.ndarray:
    """The expected 8-bit RGB of a grey image given as fractions of white."""
    grey = np.clip(np.floor(fraction * 255 + 0.5), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def _alpha_over_white(rgb: np.ndarray, alpha: float) -> np.ndarray:
    return rgb * alpha + WHITE * (1 - alpha)


def _sixteen_bit(mode: str, values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint16)).convert("I").convert(mode) if mode != "I;16" else \
        Image.fromarray(values.astype(np.uint16))


MODES = {  # name -> (image, expected RGB as floats, tolerance)
    "float-0-1": (lambda: Image.fromarray(RAMP.astype(np.float32), "F"), lambda: _grey(RAMP), 1),
    "float-0-255": (lambda: Image.fromarray((RAMP * 255).astype(np.float32), "F"), lambda: _grey(RAMP), 1),
    "float-0-65535": (lambda: Image.fromarray((RAMP * 65535).astype(np.float32), "F"), lambda: _grey(RAMP), 1),
    "int16-dark": (lambda: _sixteen_bit("I;16", RAMP * 200), lambda: _grey(np.floor(RAMP * 200) / 65535), 1),
    "int16-big-endian": (lambda: Image.new("I;16B", (64, 48), 60000), lambda: _grey(np.full((48, 64), 60000 / 65535)),
                         1),
    "int16-native": (lambda: Image.new("I;16N", (64, 48), 60000), lambda: _grey(np.full((48, 64), 60000 / 65535)), 1),
    "int32-16-bit-range": (lambda: Image.fromarray((RAMP * 65535).astype(np.int32)), lambda: _grey(RAMP), 1),
    "la-premultiplied": (lambda: Image.new("La", (64, 48), (100, 128)),
                         lambda: np.full((48, 64, 3), _alpha_over_white(100 * 255 / 128, 128 / 255)), 2),
    "rgba-premultiplied": (lambda: Image.new("RGBa", (64, 48), (100, 50, 25, 128)),
                           lambda: np.broadcast_to(_alpha_over_white(np.array([100, 50, 25]) * 255 / 128, 128 / 255),
                                                   (48, 64, 3)), 2),
    "palette-with-alpha": (lambda: Image.new("RGBA", (64, 48), (200, 100, 50, 0)).convert("PA"),
                           lambda: np.full((48, 64, 3), WHITE), 1),
    "rgb-colour-key": (lambda: _colour_keyed(), lambda: np.full((48, 64, 3), WHITE), 0),
    "la": (lambda: Image.new("LA", (64, 48), (0, 0)), lambda: np.full((48, 64, 3), WHITE), 0),
    "cmyk": (lambda: Image.new("CMYK", (64, 48), (0, 255, 0, 0)), lambda: np.broadcast_to([255, 0, 255], (48, 64, 3)),
             0),
    "bilevel": (lambda: Image.new("1", (64, 48), 1), lambda: np.full((48, 64, 3), WHITE), 0),
}


def _colour_keyed() -> Image.Image:
    """An RGB PNG with a tRNS colour key: pixels of that colour are transparent."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buffer, format="PNG", transparency=(10, 20, 30))
    return Image.open(buffer)


@pytest.mark.parametrize("case", list(MODES))
def test_every_mode_becomes_rgb_at_the_right_scale(case):
    make, expected, tolerance = MODES[case]
    out = np.asarray(to_rgb(make()), dtype=np.float64)
    assert out.shape == (48, 64, 3), case
    error = np.abs(out - np.asarray(expected(), dtype=np.float64)).max()
    assert error <= tolerance, f"{case}: off by up to {error} (8-bit levels)"


@pytest.mark.parametrize("mode, scale", [("F", 1.0), ("F", 255.0), ("I;16", 65535.0)])
def test_high_bit_depth_files_load_at_the_right_scale(tmp_path, mode, scale):
    """TIFF files as scanners and HDR tools write them (the float one with values 0-1 became all black)."""
    values = (RAMP * scale).astype(np.float32 if mode == "F" else np.uint16)
    path = tmp_path / f"{mode.replace(';', '')}-{scale:g}.tif"
    Image.fromarray(values, mode if mode == "F" else None).save(path)
    assert Image.open(path).mode == mode
    np.testing.assert_allclose(np.asarray(load_rgb(path), dtype=np.float64), _grey(RAMP), atol=1)


def _encoded(kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buffer, kind)
    return buffer.getvalue()


def _float_tiff_with_nan() -> bytes:
    values = RAMP.astype(np.float32)
    values[3, 4] = np.nan
    buffer = io.BytesIO()
    Image.fromarray(values, "F").save(buffer, format="TIFF")
    return buffer.getvalue()


UNREADABLE = {  # file name -> (contents, what the message must call it)
    "empty.png": (lambda: b"", "the file is empty"),
    "cut.jpg": (lambda: _encoded("JPEG")[:700], "damaged or truncated JPEG image"),
    "cut.png": (lambda: _encoded("PNG")[:3000], "damaged or truncated PNG image"),
    "logo.svg": (lambda: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>',
                 "SVG (vector) image"),
    "logo-svg-named.png": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>', "SVG (vector) image"),
    "notes.jpg": (lambda: b"shopping list: eggs, milk\n", "text file"),
    "photo.heic": (lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "HEIC/HEIF photo"),
    "photo.jxl": (lambda: b"\xff\x0a\xfa\x7f" + bytes(64), "JPEG XL image"),
    "scan.pdf": (lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "PDF document"),
    "login.png": (lambda: b"<!DOCTYPE html><html><body>Sign in</body></html>", "HTML page"),
    "hdr-nan.tif": (_float_tiff_with_nan, "NaN or Inf pixel values"),
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unreadable_files_are_named_with_what_they_seem_to_be(capsys, tmp_path, tiny_models, name):
    data, said = UNREADABLE[name]
    path = tmp_path / name
    path.write_bytes(data())
    with pytest.raises(ValueError) as info:  # the Python API
        load_rgb(path)
    assert str(path) in str(info.value) and said in str(info.value), info.value
    out = tmp_path / "out.png"  # the command line: one line, exit 2, before any model loads
    assert main(["--models-dir", str(tiny_models), "--image", str(path), "--instruction", "x", "--output", str(out),
                 "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(path) in line and said in line, line
    assert not out.exists()
