"""The one file-identification layer: what a file holds, told from its tensor names, and the one reader."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from step1x_core.dit.checkpoint import CheckpointError
from step1x_core.dit.loading import load_dit
from step1x_core.formats import identify as kinds
from step1x_core.formats.identify import identify
from step1x_core.formats.safetensors_file import ModelFileError, read_header
from step1x_core.qwen.folder import QwenFolderError
from step1x_core.qwen.single_file import QwenFileError, load_qwen_file
from step1x_core.vae.loader import VAEFileError, load_vae

# Representative key names of each family (as the released files name them).
FILES = {
    kinds.STEP1X_DIT: ["img_in.weight", "double_blocks.0.img_attn.qkv.weight", "connector.S.input_embedder.weight"],
    kinds.FLUX_DEV_DIT: ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
                         "model.diffusion_model.guidance_in.in_layer.weight"],
    kinds.FLUX_DIT: ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"],
    kinds.DIFFUSERS_DIT: ["transformer_blocks.0.attn.to_q.weight", "x_embedder.weight"],
    kinds.FULL_SD: ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"],
    kinds.SD_UNET: ["input_blocks.0.0.weight", "out.2.weight"],
    kinds.DIFFUSERS_VAE: ["encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"],
    kinds.DIFFUSERS_UNET: ["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"],
    kinds.SD_VAE: ["encoder.conv_in.weight", "quant_conv.weight", "decoder.conv_in.weight"],
    kinds.FLUX_VAE: ["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "decoder.conv_in.weight"],
    kinds.CLIP: ["text_model.encoder.layers.0.mlp.fc1.weight"],
    kinds.T5: ["encoder.block.0.layer.0.SelfAttention.k.weight", "shared.weight"],
    kinds.QWEN3: ["model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight"],
    kinds.GEMMA: ["model.embed_tokens.weight", "model.layers.0.post_feedforward_layernorm.weight"],
    kinds.LLAMA: ["model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight"],
    kinds.QWEN2: ["model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight",
                  "model.layers.0.self_attn.k_proj.bias", "visual.blocks.0.attn.qkv.weight"],
}


@pytest.mark.parametrize("kind", list(FILES), ids=lambda k: k.name)
def test_each_family_is_told_apart(kind):
    assert identify(FILES[kind]) is kind


def test_unknown_names_are_no_kind():
    assert identify(["some.other.weight"]) is None and identify([]) is None


def test_the_header_is_read_without_the_data(tmp_path):
    path = tmp_path / "f.safetensors"
    save_file({"a.weight": torch.zeros(3, 2, dtype=torch.bfloat16)}, str(path), metadata={"config": "{}"})
    header = read_header(path)
    assert header.shapes == {"a.weight": (3, 2)} and header.dtypes == {"a.weight": "BF16"}
    assert header.metadata == {"config": "{}"}


@pytest.mark.parametrize("load, error", [(load_dit, CheckpointError), (load_vae, VAEFileError),
                                         (load_qwen_file, QwenFileError)], ids=["dit", "vae", "qwen"])
@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl"])
def test_every_loader_refuses_pickles_the_same_way(tmp_path, load, error, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x02}q\x00.")  # a pickle: must never be unpickled
    with pytest.raises(error, match=rf"only \.safetensors files are loaded; \{suffix} files are Python pickles"):
        load(path)


def test_the_loaders_errors_share_one_base():
    assert all(issubclass(e, ModelFileError) for e in (CheckpointError, VAEFileError, QwenFileError, QwenFolderError))
