"""Unusual input images, in the standalone engine and in ComfyUI graphs.

Stated behaviour:
- Alpha: the engine (`imaging.to_rgb`, used by the pipeline, the CLI and the Image Scale node) composites
  it over white. ComfyUI's LoadImage drops it (the colour stored under transparent pixels is kept) and
  returns it as a MASK, which Step1X-Edit does not use. A 4-channel IMAGE given straight to the Qwen-VL
  Encode node loses its alpha there, as VAEEncode drops it.
- Greyscale (8 and 16 bit) becomes RGB; 16-bit values are scaled to 8 bits (the engine; ComfyUI's
  LoadImage is ComfyUI's own).
- Any size from 1x1 works (the size level sets the working size, up or down); aspect ratios up to 100:1
  work when the size level leaves both sides at least 16 pixels; beyond that the error says the aspect
  ratio is too extreme. Huge images cost their decode, not more: the work is capped by the size level.
- EXIF orientation is applied everywhere (engine: `to_rgb`; ComfyUI: LoadImage).
- Batches (ComfyUI): every image of an IMAGE batch is edited with its own embedding and reference; batch
  index 0 equals a single-image run with the same seed (ComfyUI draws the batch's noise in one call, so
  index i > 0 gets different noise than a single run of image i). The engine edits one image per call.

Already covered elsewhere: to_rgb on RGBA and 16-bit grey, load_rgb with EXIF rotation, the extreme-aspect
refusal of size_for_level (tests/images/test_imaging.py).
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_core.images.reading import load_rgb, to_rgb
from step1x_core.images.sizing import size_for_level
from step1x_core.pipeline import EditSettings
from step1x_core.commands.bench_measure import relative_error
from tests.robustness.helpers import (CAT, PREFIX, gradient, graph, peak_mb, reset_peak, rss_mb, run_error, run_ok,
                                      save_input, saved_latent)
from tests.release_names import QWEN_FOLDER

FAST = EditSettings(steps=1, size_level=32, cfg_scale=1.0)  # 1:10 needs size level 48 or more (sides >= 16)
WIDE = EditSettings(steps=1, size_level=64, cfg_scale=1.0)
LATENT_TOLERANCE = 1e-4  # batch vs single: float32 rounding of batched matmuls only


def _half_transparent(width: int = 96, height: int = 64) -> Image.Image:
    rgba = gradient(width, height, "RGBA")
    alpha = np.full((height, width), 255, np.uint8)
    alpha[:, : width // 2] = 0  # left half fully transparent, its stored colour the gradient
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _palette_with_transparency() -> Image.Image:
    image = gradient(96, 64).convert("P")
    image.info["transparency"] = 0
    return image


def _grey16() -> Image.Image:
    return Image.fromarray((np.linspace(0, 65535, 96 * 64).reshape(64, 96)).astype(np.uint16))


def _exif_rotated(path) -> Image.Image:
    """A 96x64 JPEG whose EXIF says: rotate 90 degrees on display (so it shows as 64x96)."""
    image = gradient(96, 64)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif)
    return Image.open(path)


ENGINE_IMAGES = {
    "rgba": _half_transparent,
    "la": lambda: _half_transparent().convert("LA"),
    "palette+transparency": _palette_with_transparency,
    "grey": lambda: gradient(96, 64, "L"),
    "grey16": _grey16,
    "cmyk": lambda: gradient(96, 64, "CMYK"),
    "1x1": lambda: Image.new("RGB", (1, 1), (200, 30, 30)),
    "32x32": lambda: gradient(32, 32),
    "1:10": lambda: gradient(20, 200),
    "10:1": lambda: gradient(200, 20),
}


# ---- the standalone engine -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(ENGINE_IMAGES))
def test_engine_edits_unusual_images(pipe, case):
    image = ENGINE_IMAGES[case]()
    out = pipe(image, "add a red hat", WIDE if ":" in case else FAST)
    assert out.mode == "RGB" and out.size == image.size, case
    assert np.isfinite(np.asarray(out, dtype=np.float32)).all()


def test_engine_composites_alpha_over_white(pipe):
    rgba = _half_transparent()
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    composited = Image.alpha_composite(white, rgba).convert("RGB")
    assert np.array_equal(np.asarray(to_rgb(rgba))[:, :48], np.full((64, 48, 3), 255))
    assert np.array_equal(np.asarray(pipe(rgba, "x", FAST)), np.asarray(pipe(composited, "x", FAST)))


def test_engine_respects_exif_rotation_of_opened_files(pipe, tmp_path):
    """The Python API gets Image.open(...) straight from users (see the README): EXIF applies there too."""
    opened = _exif_rotated(tmp_path / "rotated.jpg")
    assert opened.size == (96, 64)
    assert pipe(opened, "x", FAST).size == (64, 96)
    assert load_rgb(tmp_path / "rotated.jpg").size == (64, 96)


def test_engine_extreme_aspect_ratio_is_a_clear_error(pipe):
    for size, level in (((20, 200), 32), ((1000, 10), 64), ((10, 1100), 1024), ((101, 1), 1024)):
        with pytest.raises(ValueError, match="aspect ratio .*too extreme"):
            pipe(gradient(*size), "x", EditSettings(steps=1, size_level=level))


@pytest.fixture(scope="module")
def big_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "8000.png"
    ramp = Image.linear_gradient("L").resize((8000, 8000))
    Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), Image.new("L", ramp.size, 128))).save(
        path, compress_level=1)
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
def test_engine_8000px_image_is_capped_by_the_size_level(pipe, big_png):
    path = big_png
    assert size_for_level(8000, 8000, 1024) == (1024, 1024)
    decoded = 8000 * 8000 * 4 / 2**20  # MiB of one decoded copy (PIL keeps RGB in 4 bytes a pixel)
    reset_peak()
    before = rss_mb()
    image = load_rgb(path)
    loaded = peak_mb() - before
    shapes = []
    out = pipe(image, "x", FAST, callback=lambda i, n, x: shapes.append(tuple(x.shape)))
    edited = peak_mb() - before
    assert out.size == (8000, 8000)
    assert shapes == [(1, 4, 64)]  # 32x32 working size: 4 tokens of 64 channels, whatever the input size
    print(f"\n8000x8000 RGB ({decoded:.0f} MiB decoded): load_rgb peak +{loaded:.0f} MiB, "
          f"edit at size level 32 (restored to 8000x8000) peak +{edited:.0f} MiB")
    assert loaded < 1.5 * decoded, f"loading took {loaded:.0f} MiB for a {decoded:.0f} MiB image"
    assert edited < 2.5 * decoded, f"the edit took {edited:.0f} MiB for a {decoded:.0f} MiB image"


# ---- ComfyUI graphs ------------------------------------------------------------------------------------


def _saved_image(comfyui, result) -> Image.Image:
    entry = result.outputs["12"]["images"][0]
    return Image.open(comfyui.workdir / "output" / entry["subfolder"] / entry["filename"])


COMFY_IMAGES = {
    "rgba.png": _half_transparent,
    "grey.png": lambda: gradient(96, 64, "L"),
    "grey16.png": _grey16,
    "1x1.png": lambda: Image.new("RGB", (1, 1), (200, 30, 30)),
    "32x32.png": lambda: gradient(32, 32),
    "1x10.png": lambda: gradient(20, 200),
    "10x1.png": lambda: gradient(200, 20),
}


ASPECT = ("1x10.png", "10x1.png")  # need custom size 48 or more; the others run at 32


@pytest.mark.parametrize("name", list(COMFY_IMAGES))
def test_comfyui_edits_unusual_images(comfyui, name):
    image = COMFY_IMAGES[name]()
    stored = save_input(comfyui, image, name)
    size = 64 if name in ASPECT else 32
    loaded, _ = comfyui.node_class("LoadImage")().load_image(stored)
    scale = comfyui.node_class("Step1XEditImageScale")
    scaled, width, height = scale.execute(loaded, "custom", size, "bicubic").result
    assert (width, height) == image.size and scaled.shape[1:] == (*size_for_level(*image.size, size)[::-1], 3)
    result = run_ok(comfyui, graph(image=stored, prefix="img", steps=1, cfg=1.0, size=size))
    assert _saved_image(comfyui, result).size == image.size, name


def test_comfyui_loadimage_drops_alpha_and_image_scale_composites_a_4_channel_image(comfyui):
    stored = save_input(comfyui, _half_transparent(), "alpha.png")
    image, mask = comfyui.node_class("LoadImage")().load_image(stored)
    assert image.shape == (1, 64, 96, 3) and mask.shape == (1, 64, 96)
    stored_rgb = torch.from_numpy(np.asarray(gradient(96, 64), dtype=np.float32) / 255)
    torch.testing.assert_close(image[0], stored_rgb)  # ComfyUI keeps the colour under the transparency
    assert bool((mask[0, :, :48] == 1).all())

    rgba = torch.cat([image, 1 - mask[..., None]], dim=-1)  # what JoinImageWithAlpha makes
    scale = comfyui.node_class("Step1XEditImageScale")
    scaled = scale.execute(rgba, "custom", 64, "bicubic").result[0]
    assert scaled.shape == (1, 48, 64, 3)
    assert bool((scaled[0, :, :20] == 1).all())  # transparent half -> white, as in the engine

    qwen = comfyui.node_class("Step1XEditQwenVLLoader").execute(QWEN_FOLDER, "auto", "default").result[0]
    encode = comfyui.node_class("Step1XEditQwenVLEncode")
    with_alpha = encode.execute(qwen, rgba, "x", "").result[0]
    without = encode.execute(qwen, image, "x", "").result[0]
    torch.testing.assert_close(with_alpha.cond.hidden, without.cond.hidden)  # alpha dropped, as VAEEncode does


def test_comfyui_extreme_aspect_ratio_is_a_clear_error(comfyui):
    stored = save_input(comfyui, gradient(1000, 10), "1x100.png")
    error = run_error(comfyui, graph(image=stored, prefix="img"))
    assert "aspect ratio" in error and "too extreme" in error, error


def test_comfyui_respects_exif_rotation(comfyui, tmp_path):
    rotated = _exif_rotated(tmp_path / "rotated.jpg")
    stored = save_input(comfyui, rotated, "rotated.jpg", exif=rotated.getexif())
    result = run_ok(comfyui, graph(image=stored, prefix="img", steps=1))
    assert _saved_image(comfyui, result).size == (64, 96)


def _peak_of(call) -> tuple[object, float]:
    """(call's result, its peak RSS growth in MiB)."""
    reset_peak()
    before = rss_mb()
    result = call()
    return result, peak_mb() - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
def test_comfyui_8000px_image(comfyui, big_png):
    stored = f"{PREFIX}_8000.png"
    shutil.copy(big_png, comfyui.workdir / "input" / stored)
    prompt = graph(image=stored, prefix="img", steps=1, cfg=1.0)
    for node in ("11", "12"):  # the way back to 8000x8000 is measured on its own below
        del prompt[node]
    as_float = 8000 * 8000 * 3 * 4 / 2**20  # MiB of one ComfyUI IMAGE (float32) of that size
    result, graph_peak = _peak_of(lambda: run_ok(comfyui, prompt))
    assert saved_latent(comfyui, result).shape == (1, 16, 8, 8)  # custom size 64: a 64x64 working image

    loaded, load_peak = _peak_of(lambda: comfyui.node_class("LoadImage")().load_image(stored)[0])
    scale = comfyui.node_class("Step1XEditImageScale")
    scaled, scale_peak = _peak_of(lambda: scale.execute(loaded, "custom", 1024, "bicubic").result[0])
    assert scaled.shape == (1, 1024, 1024, 3)
    restore = comfyui.node_class("Step1XEditRestoreSize")
    restored, restore_peak = _peak_of(lambda: restore.execute(scaled, 8000, 8000, "bicubic").result[0])
    assert restored.shape == (1, 8000, 8000, 3)
    print(f"\n8000x8000 in ComfyUI (one float32 IMAGE: {as_float:.0f} MiB), peak RSS growth: whole edit at custom "
          f"size 64 +{graph_peak:.0f} MiB, of which LoadImage (ComfyUI's) +{load_peak:.0f} MiB; Image Scale to 1024 "
          f"+{scale_peak:.0f} MiB; Restore Size to 8000x8000 +{restore_peak:.0f} MiB")
    assert graph_peak < 4 * as_float  # no blow-up: LoadImage's copies, then ours
    assert scale_peak < 0.75 * as_float  # 8-bit copies only, never a second float frame
    assert restore_peak < 1.75 * as_float  # the result itself + 8-bit copies


def test_comfyui_batch_matches_single_image_runs(comfyui):
    """A batch of two images through the whole graph; index 0 equals the single-image run of the same seed."""
    flipped = save_input(comfyui, Image.open(CAT).transpose(Image.Transpose.FLIP_LEFT_RIGHT), "flipped.png")
    batch = graph(prefix="batch", seed=5, steps=2)
    batch["20"] = {"class_type": "LoadImage", "inputs": {"image": flipped}}
    batch["21"] = {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["20", 0]}}
    batch["2"]["inputs"]["image"] = ["21", 0]
    result = run_ok(comfyui, batch)
    latents = saved_latent(comfyui, result)
    assert latents.shape[0] == 2 and len(result.outputs["12"]["images"]) == 2
    single = saved_latent(comfyui, run_ok(comfyui, graph(prefix="single", seed=5, steps=2)))
    error = relative_error(latents[:1], single)
    assert error <= LATENT_TOLERANCE, f"batch index 0 differs from the single run by {error:.2e}"
    assert relative_error(latents[1:], latents[:1]) > 1e-3  # its own image
    single_flipped = saved_latent(comfyui, run_ok(comfyui, graph(image=flipped, prefix="single", seed=5, steps=2)))
    assert relative_error(latents[1:], single_flipped) > 1e-3  # ... with noise of its own (ComfyUI's batch noise)
