"""Compatibility matrix: ComfyUI's own nodes on a Step1X-Edit model, each graph run with and without the node.

Every node either takes effect (the output moves, or equals what it should equal) or gives a clear message;
none is a silent no-op. The README's "works with" table is this file in words. Tiny models, 64 px.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_core.commands.bench_measure import relative_error
from tests.comfyui.graphs import TINY_LORA, V11_DIT, edit_graph, fast_api_graph, run_ok, saved_latent

STEPS = 10  # divides 10000, so KSampler's "simple" scheduler lands on the official grid of t
NATIVE_TOLERANCE = 1e-5
TAKES_EFFECT = 1e-3  # a node that acts moves the latent by more than this (relative)
MASKED_INPUT = "cat_masked.png"


def graph(**kwargs) -> dict:
    kwargs.setdefault("steps", STEPS)
    kwargs.setdefault("seed", 17)
    return edit_graph(**kwargs)


def latent_of(comfyui, g: dict) -> torch.Tensor:
    return saved_latent(comfyui, run_ok(comfyui, g))


def between_loader_and_sampler(g: dict, node_id: str, class_type: str, **inputs) -> dict:
    """Insert a MODEL -> MODEL node after Load Step1X-Edit DiT, feeding the sampler."""
    g[node_id] = {"class_type": class_type, "inputs": {"model": g["9"]["inputs"]["model"], **inputs}}
    g["9"]["inputs"]["model"] = [node_id, 0]
    return g


@pytest.fixture(scope="module")
def baseline(comfyui) -> torch.Tensor:
    return latent_of(comfyui, graph(prefix="matrix_base"))


def working_size() -> tuple[int, int]:
    """(width, height) of cat.png (96x64) at the graphs' size level 64."""
    from step1x_core.images.sizing import size_for_level

    return size_for_level(96, 64, 64)


# --- model patches that act on the model call or the CFG chain ---------------------------------------
MODEL_PATCHES = {
    "LazyCache": {"reuse_threshold": 0.5, "start_percent": 0.15, "end_percent": 0.95, "verbose": False},
    "CFGNorm": {"strength": 1.0},
    "CFGZeroStar": {},
    "APG": {"eta": 0.0, "norm_threshold": 2.0, "momentum": -0.5},
    "TCFG": {},
    "RescaleCFG": {"multiplier": 0.7},
    "SkipLayerGuidanceDiT": {"double_layers": "0", "single_layers": "0", "scale": 3.0, "start_percent": 0.0,
                             "end_percent": 1.0, "rescaling_scale": 0.0},
    "SkipLayerGuidanceDiTSimple": {"double_layers": "0", "single_layers": "0", "start_percent": 0.0,
                                   "end_percent": 1.0},
    "LoraLoaderModelOnly": {"lora_name": TINY_LORA, "strength_model": 1.0},
}


@pytest.mark.parametrize("class_type", list(MODEL_PATCHES))
def test_model_patch_takes_effect_under_the_step1x_sampler(comfyui, baseline, class_type):
    g = between_loader_and_sampler(graph(prefix=f"matrix_{class_type}"), "30", class_type,
                                   **MODEL_PATCHES[class_type])
    patched = latent_of(comfyui, g)
    assert torch.isfinite(patched).all()
    assert relative_error(patched, baseline) > TAKES_EFFECT, f"{class_type} changed nothing"


def test_perp_neg_takes_effect(comfyui, baseline):
    g = between_loader_and_sampler(graph(prefix="matrix_perpneg"), "30", "PerpNeg", empty_conditioning=["7", 1],
                                   neg_scale=1.0)
    assert relative_error(latent_of(comfyui, g), baseline) > TAKES_EFFECT


def test_easycache_skips_steps_and_says_so(comfyui, baseline, caplog):
    """EasyCache hooks the DIFFUSION_MODEL wrapper: it must see the calls and skip some of them."""
    g = between_loader_and_sampler(graph(prefix="matrix_easycache", steps=20), "30", "EasyCache",
                                   reuse_threshold=0.2, start_percent=0.1, end_percent=0.95, verbose=False)
    with caplog.at_level(logging.INFO):
        cached = latent_of(comfyui, g)
    skipped = [int(m.group(1)) for m in re.finditer(r"EasyCache - skipped (\d+)/20 steps", caplog.text)]
    assert skipped and skipped[-1] >= 1, f"EasyCache skipped no step: {caplog.text[-500:]}"
    full = latent_of(comfyui, graph(prefix="matrix_easycache_off", steps=20))
    # A skipped step reuses the last output change, so the result moves (on random tiny weights, a lot).
    assert torch.isfinite(cached).all() and relative_error(cached, full) > TAKES_EFFECT


def test_model_sampling_flux_takes_effect_under_the_step1x_sampler(comfyui, baseline):
    """ModelSamplingFlux at the image's size is the official shift (same result); another shift moves it."""
    width, height = working_size()
    same = between_loader_and_sampler(graph(prefix="matrix_msf_same"), "30", "ModelSamplingFlux", max_shift=1.15,
                                      base_shift=0.5, width=width, height=height)
    assert relative_error(latent_of(comfyui, same), baseline) <= NATIVE_TOLERANCE
    other = between_loader_and_sampler(graph(prefix="matrix_msf_other"), "30", "ModelSamplingFlux", max_shift=3.0,
                                       base_shift=2.0, width=width, height=height)
    assert relative_error(latent_of(comfyui, other), baseline) > TAKES_EFFECT


# --- conditioning nodes --------------------------------------------------------------------------------
def test_conditioning_nodes_act_on_the_encoder_output(comfyui, baseline, caplog):
    zero = graph(prefix="matrix_zero")
    zero["30"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["7", 1]}}
    zero["9"]["inputs"]["negative"] = ["30", 0]
    with caplog.at_level(logging.INFO):
        assert relative_error(latent_of(comfyui, zero), baseline) > TAKES_EFFECT
    assert "not the empty instruction it was trained with" in caplog.text  # the documented effect is said

    ranged = graph(prefix="matrix_range")
    ranged["30"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["7", 0], "start": 0.0,
                                                                            "end": 0.5}}
    ranged["31"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["7", 1], "start": 0.5,
                                                                            "end": 1.0}}
    ranged["32"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["30", 0],
                                                                    "conditioning_2": ["31", 0]}}
    ranged["9"]["inputs"]["positive"] = ["32", 0]
    assert relative_error(latent_of(comfyui, ranged), baseline) > TAKES_EFFECT

    average = graph(prefix="matrix_average")
    average["30"] = {"class_type": "ConditioningAverage", "inputs": {"conditioning_to": ["7", 0],
                                                                     "conditioning_from": ["7", 1],
                                                                     "conditioning_to_strength": 0.5}}
    average["9"]["inputs"]["positive"] = ["30", 0]
    halfway = latent_of(comfyui, average)
    assert relative_error(halfway, baseline) > TAKES_EFFECT and torch.isfinite(halfway).all()


def test_conditioning_from_another_encoder_is_named(comfyui):
    for sampler in ("Step1XEditSampler", "KSampler"):
        g = native_graph(prefix="matrix_lotus", sampler=sampler) if sampler == "KSampler" else graph(prefix="x")
        g["30"] = {"class_type": "LotusConditioning", "inputs": {}}
        g["9"]["inputs"]["positive"] = ["30", 0]
        result = comfyui.run(g)
        assert not result.success
        assert "needs the conditioning from Step1X-Edit Connector" in result.error(), result.error()


# --- latent noise masks ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def masked_input(comfyui):
    """cat.png with its left half painted (alpha < 255 -> Load Image's mask > 0): fully at the left edge, fading
    towards the middle (a soft mask, for DifferentialDiffusion); the right half is protected."""
    image = Image.open(comfyui.workdir / "input" / "cat.png").convert("RGBA")
    alpha = np.full((image.height, image.width), 255, dtype=np.uint8)
    half = image.width // 2
    alpha[:, :half] = np.linspace(0, 200, half).round().astype(np.uint8)
    image.putalpha(Image.fromarray(alpha))
    image.save(comfyui.workdir / "input" / MASKED_INPUT)
    return MASKED_INPUT


def masked_graph(prefix: str, differential: bool = False, **kwargs) -> dict:
    g = graph(prefix=prefix, **kwargs)
    g["1"]["inputs"]["image"] = MASKED_INPUT
    g["30"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["8", 0], "mask": ["1", 1]}}
    g["9"]["inputs"]["reference_latent"] = ["30", 0]
    if differential:
        between_loader_and_sampler(g, "31", "DifferentialDiffusion")
    return g


def encoded_reference(comfyui) -> torch.Tensor:
    """The VAE-encoded working image, as the graphs' reference latent."""
    g = {key: node for key, node in graph(prefix="matrix_reference").items() if key in ("1", "2", "5", "8")}
    g["13"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "matrix_reference"}}
    return latent_of(comfyui, g)


def test_noise_mask_keeps_the_protected_tokens(comfyui, masked_input):
    import comfy.sampler_helpers

    edited = latent_of(comfyui, masked_graph("matrix_mask"))
    reference = encoded_reference(comfyui)
    mask = 1 - torch.from_numpy(np.asarray(Image.open(comfyui.workdir / "input" / masked_input))[..., 3] / 255.0)
    prepared = comfy.sampler_helpers.prepare_mask(mask[None].float(), edited.shape, "cpu")
    protected, free = prepared == 0, prepared > 0.5
    assert protected.any() and free.any()
    error = relative_error(edited[protected], reference[protected])
    assert error <= 1e-4, f"protected latent moved by {error:.2e}"
    assert relative_error(edited[free], reference[free]) > 0.1  # the painted part was edited


def test_differential_diffusion_takes_effect(comfyui, masked_input):
    plain = latent_of(comfyui, masked_graph("matrix_mask_plain"))
    differential = latent_of(comfyui, masked_graph("matrix_mask_dd", differential=True))
    assert relative_error(differential, plain) > TAKES_EFFECT


def test_an_empty_noise_mask_is_refused(comfyui):
    g = graph(prefix="matrix_empty_mask")  # cat.png has no alpha: Load Image's mask is all zeros
    g["30"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["8", 0], "mask": ["1", 1]}}
    g["9"]["inputs"]["reference_latent"] = ["30", 0]
    result = comfyui.run(g)
    assert not result.success and "noise mask is empty" in result.error()


# --- the native samplers -----------------------------------------------------------------------------
def native_graph(prefix: str, sampler: str = "SamplerCustomAdvanced", threshold: float = 0.93) -> dict:
    """The basic graph with the Step1X-Edit Sampler replaced by ComfyUI's own sampling nodes."""
    g = graph(prefix=prefix)
    g["20"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["7", 0], "latent": ["8", 0]}}
    g["21"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["7", 1], "latent": ["8", 0]}}
    g["22"] = {"class_type": "Step1XEditNormalizedCFG", "inputs": {"model": ["3", 0], "threshold": threshold}}
    if sampler == "KSampler":
        width, height = working_size()
        g["23"] = {"class_type": "ModelSamplingFlux", "inputs": {"model": ["22", 0], "max_shift": 1.15,
                                                                 "base_shift": 0.5, "width": width, "height": height}}
        g["9"] = {"class_type": "KSampler", "inputs": {
            "model": ["23", 0], "positive": ["20", 0], "negative": ["21", 0], "latent_image": ["8", 0],
            "seed": 17, "steps": STEPS, "cfg": 6.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
        return g
    g["23"] = {"class_type": "CFGGuider", "inputs": {"model": ["22", 0], "positive": ["20", 0], "negative": ["21", 0],
                                                     "cfg": 6.0}}
    g["24"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 17}}
    g["25"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["26"] = {"class_type": "Step1XEditScheduler", "inputs": {"latent": ["8", 0], "steps": STEPS, "denoise": 1.0}}
    g["9"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["24", 0], "guider": ["23", 0],
                                                                "sampler": ["25", 0], "sigmas": ["26", 0],
                                                                "latent_image": ["8", 0]}}
    return g


@pytest.mark.parametrize("sampler", ["SamplerCustomAdvanced", "KSampler"])
def test_native_sampling_reproduces_the_step1x_sampler(comfyui, baseline, sampler):
    native = latent_of(comfyui, native_graph(f"matrix_native_{sampler}", sampler))
    error = relative_error(native, baseline)
    assert error <= NATIVE_TOLERANCE, f"{sampler} path differs from the Step1X-Edit Sampler by {error:.2e}"


def test_renorm_cfg_runs_under_ksampler(comfyui):
    """RenormCFG reads the DiT's in_channels, as on FLUX."""
    plain = latent_of(comfyui, native_graph("matrix_renorm_off", "KSampler"))
    g = native_graph("matrix_renorm", "KSampler")
    g["27"] = {"class_type": "RenormCFG", "inputs": {"model": ["23", 0], "cfg_trunc": 100.0, "renorm_cfg": 0.5}}
    g["9"]["inputs"]["model"] = ["27", 0]
    assert relative_error(latent_of(comfyui, g), plain) > TAKES_EFFECT


def test_torch_compile_model_equals_eager(comfyui, baseline):
    g = between_loader_and_sampler(graph(prefix="matrix_compile"), "30", "TorchCompileModel", backend="inductor")
    compiled = latent_of(comfyui, g)
    error = relative_error(compiled, baseline)
    assert error <= NATIVE_TOLERANCE, f"compiled model differs from eager by {error:.2e}"


# --- loading through ComfyUI's own loader ------------------------------------------------------------
def test_native_load_diffusion_model_builds_step1x_edit(comfyui, baseline):
    from step1x_core.testing.factory import TEXT_GAIN
    from step1x_core.testing.tiny_dit import write_tiny_dit

    g = graph(prefix="matrix_unet_loader")
    g["3"] = {"class_type": "UNETLoader", "inputs": {"unet_name": V11_DIT, "weight_dtype": "default"}}
    assert relative_error(latent_of(comfyui, g), baseline) <= NATIVE_TOLERANCE

    # The diffusers layout of the same model: ComfyUI's own conversion would drop the connector.
    write_tiny_dit(comfyui.models / "diffusion_models" / "matrix-diffusers.safetensors", "v1.1", seed=1, text_hidden=64,
                   text_gain=TEXT_GAIN, layout="diffusers")
    g = graph(prefix="matrix_unet_loader_diffusers")
    g["3"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "matrix-diffusers.safetensors",
                                                      "weight_dtype": "default"}}
    assert relative_error(latent_of(comfyui, g), baseline) <= NATIVE_TOLERANCE


def test_detection_leaves_other_models_alone(comfyui):
    """A FLUX DiT is still detected as FLUX after our registration."""
    import comfy.model_detection
    import comfy.supported_models

    flux = {f"double_blocks.0.{k}": torch.zeros(1) for k in ("img_attn.norm.key_norm.scale", "img_mod.lin.weight")}
    flux |= {"img_in.weight": torch.zeros(3072, 64), "vector_in.in_layer.weight": torch.zeros(3072, 768),
             "guidance_in.in_layer.weight": torch.zeros(1), "single_blocks.0.linear1.weight": torch.zeros(1)}
    config = comfy.model_detection.model_config_from_unet(flux, "")
    assert type(config) is comfy.supported_models.Flux


# --- the masked workflow -----------------------------------------------------------------------------
def test_masked_workflow_changes_only_the_painted_area_at_full_resolution(comfyui):
    """workflows/step1x_edit_masked: outside the painted area the saved PNG is the input's own pixels."""
    result = run_ok(comfyui, fast_api_graph("step1x_edit_masked"))
    saved = next(image for output in result.outputs.values() for image in output.get("images", []))
    out = np.asarray(Image.open(comfyui.workdir / "output" / saved["subfolder"] / saved["filename"]).convert("RGB"))
    painted = Image.open(comfyui.workdir / "input" / "example.png")
    source, alpha = np.asarray(painted.convert("RGB")), np.asarray(painted)[..., 3]
    assert out.shape == source.shape  # full input resolution, not the working size
    outside, inside = alpha == 255, alpha == 0
    assert np.array_equal(out[outside], source[outside])
    assert np.abs(out[inside].astype(int) - source[inside]).mean() > 1  # the painted area was edited
