"""NaN and Inf: found where they enter (weights at load, settings and latents before sampling, every sampling
step), named with the likely cause, and never turned into an all-black image reported as a success.

In the engine (Python API and command line) and in ComfyUI graphs, including ComfyUI's own KSampler and
LoraLoaderModelOnly, which accept NaN numbers.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from step1x_core.commands.cli import main
from step1x_core.dit.checkpoint import CheckpointError
from step1x_core.dit.loading import load_dit
from step1x_core.images.sizing import pil_to_tensor, resize_to_level, tensor_to_pil
from step1x_core.pipeline import EditSettings
from step1x_core.qwen.embedder import QwenVLEmbedder
from step1x_core.qwen.folder import QwenFolderError
from step1x_core.qwen.single_file import QwenFileError
from step1x_core.vae.loader import VAEFileError, load_vae
from tests.robustness.helpers import CAT, graph, one_error_line, run_error, tiny_dit_file_state
from tests.release_names import LORA, QWEN_FILE, QWEN_FOLDER, QWEN_FP8_FILE, V10_DIT, VAE

NAN, INF = float("nan"), float("inf")
QUICK = ["--size-level", "32", "--steps", "1", "--cfg", "1", "--quiet"]


def _poisoned(sd: dict[str, torch.Tensor], key: str, value: float, at: tuple = (0,)) -> dict[str, torch.Tensor]:
    out = dict(sd)
    tensor = out[key].clone()
    tensor.view(-1)[at[0]] = value
    out[key] = tensor
    return out


# ---- weights: found at load, per tensor ----------------------------------------------------------------

DIT_POISON = {  # name -> (tensor, value, storage dtype)
    "nan-in-a-block-weight": ("double_blocks.0.img_attn.qkv.weight", NAN, torch.bfloat16),
    "inf-in-the-connector": ("connector.S.input_embedder.weight", INF, torch.bfloat16),
    "minus-inf-in-a-bias": ("single_blocks.0.linear2.bias", -INF, torch.bfloat16),
    "nan-in-a-norm-scale": ("double_blocks.0.img_attn.norm.query_norm.scale", NAN, torch.float32),
    "nan-in-fp8-storage": ("single_blocks.0.linear1.weight", NAN, torch.float8_e4m3fn),
}


@pytest.mark.parametrize("case", sorted(DIT_POISON))
def test_non_finite_dit_weights_are_named_at_load(tmp_path, case):
    key, value, dtype = DIT_POISON[case]
    sd = {k: v.to(dtype) for k, v in _poisoned(tiny_dit_file_state(), key, value).items()}
    path = tmp_path / f"{case}.safetensors"
    save_file(sd, str(path))
    for weight_dtype in (None, torch.float32):  # kept as stored (assigned as is) and cast
        with pytest.raises(CheckpointError) as info:
            load_dit(path, dtype=weight_dtype)
        message = str(info.value)
        assert path.name in message and key in message, message
        assert ("NaN" if math.isnan(value) else "Inf") in message and "download" in message, message


def test_weights_that_overflow_the_chosen_dtype_are_named(tmp_path):
    sd = {k: v.float() for k, v in tiny_dit_file_state().items()}
    sd["txt_in.weight"] = sd["txt_in.weight"] * 1e7  # fine in float32, beyond float16's 65504
    path = tmp_path / "large.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"large.safetensors: tensor txt_in.weight overflows float16.*bfloat16"):
        load_dit(path, dtype=torch.float16)


def test_non_finite_vae_weights_are_named(tmp_path, tiny_models):
    sd = load_file(str(tiny_models / "vae" / VAE))
    path = tmp_path / VAE
    save_file(_poisoned(sd, "decoder.conv_out.weight", NAN), str(path))
    with pytest.raises(VAEFileError, match=r"ae.safetensors: tensor decoder.conv_out.weight holds 1 NaN"):
        load_vae(path)


def test_non_finite_qwen_weights_are_named_in_folder_and_single_file(tmp_path, tiny_models):
    folder = Path(shutil.copytree(tiny_models / "text_encoders" / QWEN_FOLDER, tmp_path / "qwen"))
    sd = load_file(str(folder / "model.safetensors"))
    save_file(_poisoned(sd, "model.layers.1.mlp.down_proj.weight", INF), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(QwenFolderError, match=r"qwen: tensor model.layers.1.mlp.down_proj.weight holds 1 Inf"):
        QwenVLEmbedder.from_pretrained(folder, dtype=torch.float32)

    single = tmp_path / QWEN_FILE
    fp8 = load_file(str(tiny_models / "text_encoders" / QWEN_FP8_FILE))
    key = "model.layers.0.self_attn.q_proj.weight"
    bits = fp8[key].view(torch.uint8).clone()
    bits[0, 0] = 0x7F  # e4m3fn's NaN
    fp8[key] = bits.view(torch.float8_e4m3fn)
    meta = {"format": "pt"}
    with safe_open(str(tiny_models / "text_encoders" / QWEN_FP8_FILE), "pt") as f:
        meta.update(f.metadata() or {})
    save_file(fp8, str(single), metadata=meta)
    with pytest.raises(QwenFileError, match=rf"qwen_2.5_vl_7b.safetensors: tensor {key} holds 1 NaN"):
        QwenVLEmbedder.from_pretrained(single, dtype=torch.float32)


def test_cli_with_a_nan_dit_exits_2_with_one_line(capsys, tmp_path, tiny_models):
    path = tmp_path / "dit.safetensors"
    save_file(_poisoned(tiny_dit_file_state(), "single_blocks.0.linear1.weight", NAN), str(path))
    out = tmp_path / "out.png"
    code = main(["--models-dir", str(tiny_models), "--dit", str(path), "--image", str(CAT), "--instruction", "x",
                 "--output", str(out), *QUICK])
    assert code == 2 and not out.exists()
    line = one_error_line(capsys.readouterr().err)
    assert "dit.safetensors: tensor single_blocks.0.linear1.weight holds 1 NaN" in line, line


# ---- settings and latents: refused before sampling -----------------------------------------------------


@pytest.mark.parametrize("field, value", [("cfg_scale", NAN), ("cfg_scale", INF), ("strength", NAN),
                                          ("norm_cfg_threshold", NAN), ("norm_cfg_threshold", -INF),
                                          ("step_cache", NAN)])
def test_python_api_refuses_non_finite_settings(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        EditSettings(**{field: value}).validate()


@pytest.mark.parametrize("field, value", [("steps", NAN), ("steps", 2.5), ("size_level", NAN), ("seed", 1.5),
                                          ("seed", -1), ("cfg_steps", NAN), ("steps", True)])
def test_python_api_refuses_counts_that_are_not_whole_numbers(field, value):
    with pytest.raises(ValueError, match=f"{field} must be"):
        EditSettings(**{field: value}).validate()


@pytest.mark.parametrize("flag", ["--step-cache", "--cfg", "--norm-cfg-threshold"])
def test_cli_refuses_non_finite_numbers(capsys, tmp_path, tiny_models, flag):
    out = tmp_path / "out.png"
    argv = ["--models-dir", str(tiny_models), "--image", str(CAT), "--instruction", "x", "--output", str(out),
            *QUICK, flag, "nan"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and not out.exists()
    assert f"argument {flag}: must be a finite number" in one_error_line(capsys.readouterr().err)


def _working_pixels():
    return pil_to_tensor(resize_to_level(Image.open(CAT).convert("RGB"), 32))


@pytest.mark.parametrize("where", ["reference", "conditioning"])
def test_engine_stops_sampling_on_a_non_finite_input_and_names_it(pipe, where):
    pixels = _working_pixels()
    settings = EditSettings(steps=2, size_level=32, cfg_scale=1.0)
    cond, uncond = pipe.encode_prompt("x", pixels, with_uncond=False)
    reference = pipe.encode_image(pixels)
    if where == "reference":
        reference = reference.clone()
        reference[0, 0, 0, 0] = NAN
        expected = "the latent entering the DiT holds 1 NaN"
    else:
        tokens = cond.ctx.tokens.clone()
        tokens[0, 0, 0] = INF
        cond = dataclasses.replace(cond, ctx=dataclasses.replace(cond.ctx, tokens=tokens))
        expected = "the instruction's conditioning holds NaN/Inf"
    with pytest.raises(ValueError, match=rf"step 1 of 2 \(t=1.000\): {expected}"):
        pipe.sample((cond, uncond), reference, settings)


def test_engine_stops_when_the_dit_itself_makes_nan(pipe):
    """Weights changed after the load check (as a patch would): the first step stops, naming the DiT."""
    pixels = _working_pixels()
    ctx = pipe.encode_prompt("x", pixels, with_uncond=False)
    reference = pipe.encode_image(pixels)
    weight = pipe.dit.final_layer.linear.bias
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0] = NAN
        with pytest.raises(ValueError,
                           match=r"step 1 of 3.*the DiT.s weights hold NaN/Inf \(e.g. final_layer.linear.bias\)"):
            pipe.sample(ctx, reference, EditSettings(steps=3, size_level=32, cfg_scale=1.0))
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_no_image_is_made_from_nan():
    image = torch.rand(3, 8, 8)
    image[1, 2, 3] = NAN
    with pytest.raises(ValueError, match="the image holds 1 NaN"):
        tensor_to_pil(image)
    assert np.asarray(tensor_to_pil(torch.rand(3, 8, 8))).shape == (8, 8, 3)


# ---- inside ComfyUI ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["cfg", "denoise", "norm_cfg_threshold"])
def test_comfyui_sampler_refuses_nan_numbers(comfyui, field):
    """NaN passes ComfyUI's min/max validation (an Inf does not), then reached the sampler."""
    prompt = graph(prefix="nan", steps=1, size=32)
    prompt["9"]["inputs"][field] = NAN
    error = run_error(comfyui, prompt)
    assert f"{field} must be a finite number" in error, error


def test_comfyui_ksampler_with_nan_cfg_stops_at_the_first_step(comfyui):
    """ComfyUI's own KSampler on the Step1X-Edit MODEL: the loader's guard stops it, naming cfg."""
    prompt = graph(prefix="nan_ksampler", steps=1, size=32)
    prompt["20"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["7", 0], "latent": ["8", 0]}}
    prompt["21"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["7", 1], "latent": ["8", 0]}}
    prompt["9"] = {"class_type": "KSampler", "inputs": {
        "model": ["3", 0], "positive": ["20", 0], "negative": ["21", 0], "latent_image": ["8", 0], "seed": 1,
        "steps": 2, "cfg": NAN, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    error = run_error(comfyui, prompt)
    assert "sampling stopped at sigma" in error and "cfg is nan" in error, error


def test_comfyui_nan_lora_strength_is_refused(comfyui):
    prompt = graph(prefix="nan_lora", steps=1, size=32, dit=V10_DIT,
                   lora=LORA, lora_strength=NAN)
    error = run_error(comfyui, prompt)
    assert "LoRA's strength" in error and "must be a finite number" in error, error


def test_comfyui_lora_file_with_nan_is_refused(comfyui, model_files, tiny_models):
    lora = load_file(str(tiny_models / "loras" / LORA))
    path = model_files("loras", "nan-lora.safetensors")
    save_file(_poisoned(lora, "lora_unet_single_blocks_0_linear2.lora_up.weight", NAN), str(path))
    prompt = graph(prefix="nan_lora_file", steps=1, size=32, dit=V10_DIT, lora=path.name)
    error = run_error(comfyui, prompt)
    assert "LoRA patching" in error and "NaN" in error and "corrupt" in error, error


def test_comfyui_dit_with_nan_is_refused_by_the_loader(comfyui, model_files):
    path = model_files("diffusion_models", "nan-dit.safetensors")
    save_file(_poisoned(tiny_dit_file_state(), "double_blocks.0.txt_mlp.0.weight", NAN), str(path))
    error = run_error(comfyui, graph(dit=path.name, prefix="nan_dit", steps=1, size=32))
    assert f"{path.name}: tensor double_blocks.0.txt_mlp.0.weight holds 1 NaN" in error, error


def test_comfyui_nan_reference_latent_is_refused(comfyui):
    prompt = graph(prefix="nan_latent", steps=1, size=32)
    prompt["20"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["8", 0], "multiplier": NAN}}
    prompt["9"]["inputs"]["reference_latent"] = ["20", 0]
    error = run_error(comfyui, prompt)
    assert "reference_latent holds" in error and "NaN" in error, error


def test_comfyui_nan_image_is_refused_by_the_image_nodes(comfyui):
    image = torch.rand(1, 40, 40, 3)
    image[0, 5, 5, 1] = NAN
    for node, args in (("Step1XEditImageScale", ("custom", 32, "bicubic")), ("Step1XEditRestoreSize", (64, 64,
                                                                                                       "bicubic"))):
        with pytest.raises(ValueError, match="the image holds 1 NaN"):  # the pack's own NonFiniteError
            comfyui.node_class(node).execute(image, *args)
    qwen = comfyui.node_class("Step1XEditQwenVLLoader").execute(QWEN_FOLDER, "auto", "default").result[0]
    with pytest.raises(ValueError, match="the image holds 1 NaN"):
        comfyui.node_class("Step1XEditQwenVLEncode").execute(qwen, image, "x", "")


def test_finite_checks_see_every_float_format():
    from step1x_core.finite import all_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2):
        clean = torch.randn(64, 3).to(dtype)
        assert all_finite(clean), dtype
        for bad in (NAN, INF, -INF):
            t = torch.randn(64, 3)
            t[7, 1] = bad
            t = t.to(dtype)
            if dtype == torch.float8_e4m3fn and math.isinf(bad):
                continue  # e4m3fn has no Inf: torch saturates it to +-448
            assert not all_finite(t), (dtype, bad)
