"""The standalone pipeline end to end on tiny models (real files, real Qwen/VAE/DiT code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_core.release_files import find_in_models_dir
from step1x_core.images.sizing import pil_to_tensor, resize_to_level
from step1x_core.pipeline import EditSettings, Step1XEditPipeline
from step1x_core.commands.bench_measure import relative_error
from tests.golden import REPO_ROOT

FAST = dict(steps=3, size_level=64)


@pytest.fixture(scope="module")
def cat():
    return Image.open(REPO_ROOT / "tests" / "data" / "cat.png").convert("RGB")


def _array(image):
    return np.asarray(image, dtype=np.int16)


def test_edit_restores_input_size_and_is_seeded(pipe, cat):
    first = pipe(cat, "add a red hat", EditSettings(seed=1, **FAST))
    again = pipe(cat, "add a red hat", EditSettings(seed=1, **FAST))
    other = pipe(cat, "add a red hat", EditSettings(seed=2, **FAST))
    assert first.size == cat.size and first.mode == "RGB"
    assert np.array_equal(_array(first), _array(again))
    assert not np.array_equal(_array(first), _array(other))


def test_instruction_changes_the_result(pipe, cat):
    a = pipe(cat, "add a red hat", EditSettings(seed=1, **FAST))
    b = pipe(cat, "make it night", EditSettings(seed=1, **FAST))
    assert not np.array_equal(_array(a), _array(b))


def test_keep_working_size(pipe, cat):
    out = pipe(cat, "add a red hat", EditSettings(restore_size=False, **FAST))
    assert out.size == (64, 48)  # 96x64 at size level 64: 79x53 -> floored to 16


def test_callback_sees_every_step_and_can_interrupt(pipe, cat):
    seen = []
    pipe(cat, "add a red hat", EditSettings(**FAST), callback=lambda i, n, x: seen.append((i, n, x.shape)))
    assert [s[:2] for s in seen] == [(0, 3), (1, 3), (2, 3)]

    class Stop(Exception):
        pass

    def stop(i, n, x):
        raise Stop

    with pytest.raises(Stop):
        pipe(cat, "add a red hat", EditSettings(**FAST), callback=stop)


def test_cfg_one_runs_a_single_branch(pipe, cat):
    calls = []
    original = pipe.dit.forward_context

    def counting(img, *args, **kwargs):
        calls.append(img.shape[0])
        return original(img, *args, **kwargs)

    pipe.dit.forward_context = counting
    try:
        pipe(cat, "add a red hat", EditSettings(cfg_scale=1.0, **FAST))
    finally:
        del pipe.dit.forward_context
    assert calls == [1, 1, 1]


def test_img2img_strength_stays_closer_to_the_input(pipe, cat):
    """Lower strength starts nearer the reference latent and runs fewer steps, so the edited latent
    lands nearer the input's (measured on latents: the tiny random VAE decodes anything far from
    the input pixels)."""
    pixels = pil_to_tensor(resize_to_level(cat, FAST["size_level"]))
    ctx = pipe.encode_prompt("add a red hat", pixels)
    reference = pipe.encode_image(pixels)

    def distance(strength):
        edited = pipe.sample(ctx, reference, EditSettings(strength=strength, seed=3, **{**FAST, "steps": 6}))
        return relative_error(edited, reference)

    full, half, light = distance(1.0), distance(0.5), distance(0.2)  # 6, 3 and 2 of the 6 steps
    assert light < 0.5 * full and light < half < full, (light, half, full)


@pytest.mark.parametrize("settings, message", [
    (EditSettings(steps=0), "steps"),
    (EditSettings(cfg_scale=0.5), "cfg"),
    (EditSettings(strength=0.0), "strength"),
    (EditSettings(size_level=8), "size_level"),
])
def test_bad_settings_are_refused(pipe, cat, settings, message):
    with pytest.raises(ValueError, match=message):
        pipe(cat, "add a red hat", settings)


def test_empty_instruction_is_allowed_with_a_warning(pipe, cat, caplog):
    out = pipe(cat, "", EditSettings(**FAST))
    assert out.size == cat.size
    assert "empty instruction" in caplog.text


def test_fp8_weights_run(tiny_models, cat):
    pipe = Step1XEditPipeline.from_files(find_in_models_dir(tiny_models, "dit"), find_in_models_dir(tiny_models, "vae"),
                                         find_in_models_dir(tiny_models, "text_encoder"), device="cpu",
                                         weight_dtype=torch.float8_e4m3fn)
    assert pipe.dit.img_in.weight.dtype == torch.float8_e4m3fn
    assert pipe(cat, "add a red hat", EditSettings(**FAST)).size == cat.size


def test_speed_options_run_and_change_the_result(pipe, cat):
    exact = pipe(cat, "add a red hat", EditSettings(seed=5, **FAST))
    truncated = pipe(cat, "add a red hat", EditSettings(seed=5, cfg_steps=1, **FAST))
    cached = pipe(cat, "add a red hat", EditSettings(seed=5, step_cache=1e9, **FAST))
    assert not np.array_equal(_array(exact), _array(truncated))
    assert not np.array_equal(_array(exact), _array(cached))
    with pytest.raises(ValueError, match="step_cache"):
        pipe(cat, "x", EditSettings(step_cache=0.0, **FAST))
