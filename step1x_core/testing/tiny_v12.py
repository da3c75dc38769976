"""A tiny Step1X-Edit v1.2 release in the published layout: the diffusers ``transformer/`` folder (config.json,
two shards and their index) and the ``text_encoder/`` folder (the fine-tuned Qwen2.5-VL with its tokenizer,
processor and generation config), as ``step1x-edit-download --version v1.2`` places them in a models folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..dit.diffusers_config import CLASS_NAME
from ..dit.params import DiTParams
from .tiny_dit import original_to_diffusers, tiny_dit_params, tiny_dit_state_dict
from .tiny_qwen import write_tiny_qwen

SHARD_NAME = "diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def diffusers_config(params: DiTParams) -> dict:
    """The config.json diffusers saves for a Step1XEditTransformer2DModel with these hyperparameters."""
    return {"_class_name": CLASS_NAME, "_diffusers_version": "0.36.0.dev0",
            "attention_head_dim": params.head_dim, "axes_dims_rope": list(params.axes_dim),
            "connector_depth": params.connector.depth, "connector_heads_num": params.connector.num_heads,
            "connector_hidden_size": params.connector.hidden_size, "connector_in_channels": params.connector.in_channels,
            "enable_text_token_mapping": params.version.has_text_token_mapping, "guidance_embeds": False,
            "in_channels": params.in_channels, "joint_attention_dim": params.context_in_dim,
            "num_attention_heads": params.num_heads, "num_layers": params.depth,
            "num_single_layers": params.depth_single_blocks, "out_channels": None, "patch_size": 1,
            "timestep_in_dim": 256, "vector_in_dim": params.vec_in_dim}


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 2) -> None:
    """``tensors`` as diffusers shards plus their index, in ``folder``."""
    names = sorted(tensors)
    per_shard = math.ceil(len(names) / shards)
    weight_map = {}
    for index in range(shards):
        file_name = SHARD_NAME.format(index=index + 1, count=shards)
        chunk = {name: tensors[name].contiguous() for name in names[index * per_shard:(index + 1) * per_shard]}
        save_file(chunk, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2) + "\n")


def write_tiny_v12_transformer(folder: str | Path, seed: int = 0, text_hidden: int = 64,
                               text_gain: float = 1.0) -> Path:
    """A tiny v1.2 DiT (with text_token_mapping) as the release's transformer/ folder, bf16 like the release."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = tiny_dit_params("v1.2", text_hidden)
    sd = original_to_diffusers(tiny_dit_state_dict(params, seed, text_gain), params)
    write_sharded(folder, {k: v.to(torch.bfloat16) for k, v in sd.items()})
    (folder / "config.json").write_text(json.dumps(diffusers_config(params), indent=2, sort_keys=True) + "\n")
    return folder


def write_tiny_v12_text_encoder(folder: str | Path, seed: int = 0) -> Path:
    """A tiny "fine-tuned" Qwen2.5-VL as the v1.2 release's text_encoder/ folder (tokenizer files included)."""
    return write_tiny_qwen(Path(folder), seed=seed, shards=2)
