"""What the user picks: combo values outside their lists, LoRAs that patch nothing, model folders with links that
lead nowhere, and which model file the command line takes.

ComfyUI 0.3.64 does not check V3 combo values against their lists, so the nodes do it in ``execute``, naming the
valid values. A LoRA whose keys match nothing ran as a success with a server-log line only; the sampler now says
in the UI how many DiT weights each LoRA patched. A link loop in models/ was listed and then "not found".
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from step1x_core.commands.cli import main
from step1x_core.release_files import find_in_models_dir
from tests.robustness.helpers import CAT, PREFIX, graph, one_error_line, run_error, run_ok
from tests.release_names import LORA as TINY_LORA, QWEN_FOLDER as QWEN, V10_DIT as V10, V11_DIT as V11


def _refused(comfyui, prompt: dict) -> str:
    """The node's error; a ComfyUI that checks combos itself refuses the prompt with "not in list" instead."""
    try:
        return run_error(comfyui, prompt)
    except AssertionError as refused:
        assert "not in list" in str(refused), refused
        return str(refused)


# ---- combo values ---------------------------------------------------------------------------------------

BAD_COMBOS = [  # (node, input, value, valid values the message must list)
    ("3", "weight_dtype", "fp16", ["'default'", "'bf16'", "'fp8_e4m3fn'", "'fp8_e4m3fn_fast'"]),
    ("3", "version", "v2.0", ["'auto'", "'v1.0'", "'v1.1'"]),
    ("4", "dtype", "float64", ["'auto'", "'float32'", "'bfloat16'", "'float16'"]),
    ("4", "device", "cuda:7", ["'default'", "'cpu'"]),
    ("2", "size_level", "1024px", ["'512'", "'768'", "'1024'", "'custom'"]),
    ("2", "resample", "box", ["'bicubic'", "'lanczos'"]),
    ("11", "resample", "area", ["'bicubic'", "'lanczos'"]),
    ("3", "dit_name", "step1x-edit-v2.safetensors", [f"'{V11}'"]),
    ("4", "model_folder", "Qwen2.5-VL-3B-Instruct", [f"'{QWEN}'"]),
]


@pytest.mark.parametrize("node, field, value, valid", BAD_COMBOS, ids=[f"{c[1]}={c[2]}" for c in BAD_COMBOS])
def test_comfyui_combo_values_outside_the_list_name_the_valid_ones(comfyui, node, field, value, valid):
    prompt = graph(prefix="combo", steps=1, size=32)
    prompt[node]["inputs"][field] = value
    error = _refused(comfyui, prompt)
    if "not in list" in error:
        return  # a newer ComfyUI refused it before the node ran
    assert f"{field} {value!r}" in error and "KeyError" not in error, error
    for option in valid:
        assert option in error, error


def test_comfyui_combo_check_also_guards_direct_execute_calls(comfyui):
    loader = comfyui.node_class("Step1XEditDiTLoader")
    with pytest.raises(ValueError, match=r"weight_dtype 'fp16' is not one of its choices: 'default', 'bf16'"):
        loader.execute(V11, "fp16", "auto")
    scale = comfyui.node_class("Step1XEditImageScale")
    with pytest.raises(ValueError, match=r"size_level '2048' is not one of its choices"):
        scale.execute(torch.rand(1, 32, 32, 3), "2048", 1024, "bicubic")
    encode = comfyui.node_class("Step1XEditQwenVLEncode")
    with pytest.raises(ValueError, match=r"prompt_format 'v1.2 ' is not one of its choices: 'v1.0 / v1.1', 'v1.2'"):
        encode.execute(None, None, "x", "", "v1.2 ")
    paste = comfyui.node_class("Step1XEditMaskedPaste")
    with pytest.raises(ValueError, match=r"resample 'cubic' is not one of its choices"):
        paste.execute(torch.rand(1, 8, 8, 3), torch.rand(1, 8, 8, 3), torch.ones(1, 8, 8), 0, "cubic")


# ---- LoRAs that patch nothing, or little -------------------------------------------------------------------


def _lora_texts(result) -> list[str]:
    return [data["text"] for event, data in result.events if event == "progress_text" and data["node"] == "9"]


def _write_lora(path: Path, tensors: dict) -> str:
    save_file(tensors, str(path))
    return path.name


def _sdxl_lora() -> dict[str, torch.Tensor]:
    keys = ["lora_unet_input_blocks_1_1_proj_in", "lora_unet_output_blocks_3_1_proj_out", "lora_te1_text_model_"
            "encoder_layers_0_mlp_fc1"]
    return {f"{k}.{part}": torch.randn(4, 8) for k in keys for part in ("lora_down.weight", "lora_up.weight")}


def test_comfyui_lora_that_matches_nothing_is_reported_on_the_sampler(comfyui, model_files):
    name = _write_lora(model_files("loras", "sdxl-style.safetensors"), _sdxl_lora())
    result = run_ok(comfyui, graph(prefix="lora_none", steps=1, size=32, dit=V10, lora=name))
    texts = _lora_texts(result)
    assert any("LoRA: 0 DiT weights patched" in t and "no effect" in t for t in texts), texts


def test_comfyui_lora_that_matches_few_weights_is_reported_with_the_count(comfyui, model_files, tiny_models):
    official = load_file(str(tiny_models / "loras" / TINY_LORA))
    one_module = {k: v for k, v in official.items() if k.startswith("lora_unet_double_blocks_0_img_attn_qkv.")}
    name = _write_lora(model_files("loras", "mostly-foreign.safetensors"), {**_sdxl_lora(), **one_module})
    texts = _lora_texts(run_ok(comfyui, graph(prefix="lora_few", steps=1, size=32, dit=V10, lora=name)))
    assert any("LoRA: only 1 DiT weights patched (the transformer blocks have 13 Linear layers)" in t
               for t in texts), texts


def test_comfyui_matching_lora_shows_its_count(comfyui):
    texts = _lora_texts(run_ok(comfyui, graph(prefix="lora_all", steps=1, size=32, dit=V10, lora=TINY_LORA)))
    assert any("LoRA: 13 DiT weights patched (strength 1)" in t for t in texts), texts


# ---- model folders with links that lead nowhere ------------------------------------------------------------


def _dit_choices(comfyui) -> list[str]:
    comfyui.invalidate_file_lists()
    schema = comfyui.node_class("Step1XEditDiTLoader").define_schema()
    return next(i.options for i in schema.inputs if i.id == "dit_name")


def _qwen_choices(comfyui) -> list[str]:
    comfyui.invalidate_file_lists()
    loader = comfyui.node_class("Step1XEditQwenVLLoader")
    return sys.modules[loader.__module__].qwen_choices()


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links")
@pytest.mark.parametrize("kind", ["self-loop", "two-link-loop", "dangling"])
def test_comfyui_broken_links_are_not_listed_and_named_when_chosen(comfyui, model_files, kind):
    link = model_files("diffusion_models", f"{kind}.safetensors")
    if kind == "self-loop":
        os.symlink(link.name, link)
    elif kind == "two-link-loop":
        other = model_files("diffusion_models", f"{kind}-other.safetensors")
        os.symlink(other.name, link)
        os.symlink(link.name, other)
    else:
        os.symlink("deleted-download.safetensors", link)
    assert link.name not in _dit_choices(comfyui) and V11 in _dit_choices(comfyui)
    error = _refused(comfyui, graph(dit=link.name, prefix="link", steps=1, size=32))
    if "not in list" not in error:
        expected = "does not exist" if kind == "dangling" else "symbolic link in a loop"
        assert link.name in error and expected in error, error


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links")
def test_comfyui_folder_link_back_into_models_is_not_listed_again(comfyui, model_files):
    for folder in ("diffusion_models", "text_encoders"):
        os.symlink(".", model_files(folder, "loop"), target_is_directory=True)
    loop = f"{PREFIX}-loop/"
    assert not [n for n in _dit_choices(comfyui) if n.startswith(loop)], _dit_choices(comfyui)
    assert not [n for n in _qwen_choices(comfyui) if n.startswith(loop)], _qwen_choices(comfyui)
    assert QWEN in _qwen_choices(comfyui)


# ---- which model file the command line takes ------------------------------------------------------------


@pytest.fixture
def models_dir(tmp_path, tiny_models) -> Path:
    """A models/ folder whose files are links to the tiny models (so single ones can be broken or left out)."""
    root = tmp_path / "models"
    for folder in ("diffusion_models", "text_encoders", "vae"):
        (root / folder).mkdir(parents=True)
        for entry in (tiny_models / folder).iterdir():
            os.symlink(entry, root / folder / entry.name)
    return root


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links")
@pytest.mark.parametrize("broken", ["dangling", "loop"])
def test_cli_never_falls_back_from_a_broken_dit_to_another(capsys, tmp_path, models_dir, broken):
    dit = models_dir / "diffusion_models" / V11
    dit.unlink()
    os.symlink("partial-download.safetensors" if broken == "dangling" else V11, dit)
    out = tmp_path / "out.png"
    assert main(["--models-dir", str(models_dir), "--image", str(CAT), "--instruction", "x", "--output", str(out),
                 "--size-level", "32", "--steps", "1", "--cfg", "1", "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(dit) in line and ("does not exist" if broken == "dangling" else "in a loop") in line, line
    assert not out.exists()


def test_cli_never_falls_back_from_a_broken_text_encoder_folder(models_dir):
    folder = models_dir / "text_encoders" / QWEN
    folder.unlink()
    os.symlink(models_dir / "text_encoders" / "moved-away", folder, target_is_directory=True)
    with pytest.raises(FileNotFoundError, match=f"{QWEN} is a symbolic link"):
        find_in_models_dir(models_dir, "text_encoder")


def test_version_chooses_the_dit_file_and_never_takes_the_other_version(models_dir):
    assert find_in_models_dir(models_dir, "dit", "v1.0").name == V10
    (models_dir / "diffusion_models" / V10).unlink()
    with pytest.raises(FileNotFoundError, match=f"no v1.0 dit model under {models_dir}: looked for "
                                                f"diffusion_models/{V10}"):
        find_in_models_dir(models_dir, "dit", "v1.0")


def test_taking_another_dit_than_the_recommended_one_is_said(models_dir, caplog):
    (models_dir / "diffusion_models" / V11).unlink()
    with caplog.at_level(logging.INFO):
        assert find_in_models_dir(models_dir, "dit").name == V10
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(V11 in w and f"using {V10}" in w and "--version" in w for w in warnings), warnings


# ---- inputs from the wrong kind of node ------------------------------------------------------------------


def test_comfyui_sampler_names_a_latent_of_another_vae(comfyui):
    prompt = graph(prefix="sd_latent", steps=1, size=32)
    prompt["20"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}}
    prompt["9"]["inputs"]["reference_latent"] = ["20", 0]  # 4 channels, as an SD VAE makes
    error = run_error(comfyui, prompt)
    assert "reference_latent has shape [1, 4, 4, 4]" in error and "16-channel" in error, error
    assert "mat1 and mat2" not in error, error


def test_comfyui_sampler_names_conditioning_from_another_encoder(comfyui):
    model = comfyui.node_class("Step1XEditDiTLoader").execute(V11, "default", "auto").result[0]
    foreign = [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]]  # what CLIP Text Encode makes
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    with pytest.raises(ValueError, match="the positive conditioning: Step1X-Edit needs the conditioning from Step1X-Edit Connector.*CLIP Text Encode"):
        comfyui.node_class("Step1XEditSampler").execute(model, foreign, foreign, latent, 0, 1, 1.0, 0.93, 1.0)


def test_comfyui_image_nodes_name_an_empty_batch(comfyui):
    with pytest.raises(ValueError, match=r"got shape \[0, 32, 32, 3\] \(an empty batch\)"):
        comfyui.node_class("Step1XEditImageScale").execute(torch.zeros(0, 32, 32, 3), "custom", 32, "bicubic")
