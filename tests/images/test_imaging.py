"""The size-level resize arithmetic, filters, and image conversions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from step1x_core.images.reading import load_rgb, to_rgb
from step1x_core.images.sizing import pil_to_tensor, resize_to_level, restore_size, size_for_level, tensor_to_pil


@pytest.mark.parametrize("size, level, expected", [
    ((1024, 1024), 1024, (1024, 1024)),
    ((1024, 1024), 512, (512, 512)),
    ((1920, 1080), 1024, (1360, 768)),  # the spec's worked example
    ((1080, 1920), 1024, (768, 1360)),
    ((640, 480), 768, (880, 656)),  # 887x666 before the floor to 16
])
def test_size_for_level_examples(size, level, expected):
    assert size_for_level(*size, level) == expected


@given(st.integers(16, 4000), st.integers(16, 4000), st.sampled_from([256, 512, 768, 1024]))
def test_size_for_level_properties(width, height, level):
    ratio = width / height
    if max(ratio, 1 / ratio) * 16 > level:  # too extreme for this level: must be refused
        return
    w, h = size_for_level(width, height, level)
    assert w % 16 == 0 and h % 16 == 0
    assert w * h <= (level + 16) ** 2 * 1.02  # about level**2, never much more
    assert abs(w / h - ratio) <= ratio * (16 / min(w, h)) + 1e-9  # aspect kept within one 16-pixel step


def test_extreme_aspect_ratio_refused():
    with pytest.raises(ValueError, match="aspect ratio"):
        size_for_level(10000, 10, 256)


def test_resize_filters_differ():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    bicubic = resize_to_level(image, 128, "bicubic")
    lanczos = resize_to_level(image, 128, "lanczos")
    assert bicubic.size == lanczos.size == size_for_level(300, 200, 128)
    assert not np.array_equal(np.asarray(bicubic), np.asarray(lanczos))
    with pytest.raises(ValueError, match="resample filter"):
        resize_to_level(image, 128, "box-ish")
    assert restore_size(bicubic, (300, 200)).size == (300, 200)


def test_tensor_round_trip_is_exact():
    array = (np.arange(16 * 16 * 3) % 256).astype(np.uint8).reshape(16, 16, 3)
    image = Image.fromarray(array)
    tensor = pil_to_tensor(image)
    assert tensor.shape == (1, 3, 16, 16) and tensor.max() <= 1.0
    assert np.array_equal(np.asarray(tensor_to_pil(tensor)), array)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    path = tmp_path / "a.png"
    rgba.save(path)
    assert load_rgb(path).mode == "RGB"


def test_sixteen_bit_grey_is_scaled(tmp_path):
    grey = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(grey).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_respected(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif)
    assert load_rgb(path).size == (20, 40)
