"""A tiny random Step1X-Edit DiT + connector in the official checkpoint layout."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..dit.diffusers_keys import original_to_diffusers as diffusers_layout
from ..dit.params import ConnectorParams, DiTParams
from ..dit.model import Step1XEditDiT
from ..versions import Version

# scale_factor's initial value in the official code; a trained v1.0 file holds its own value.
INITIAL_SCALE_FACTOR = -0.91
# v1.2's text_token_mapping reads raw token embeddings, about 1/8 in the tiny Qwen: this makes them O(1).
MAPPING_GAIN = 50.0


def tiny_dit_params(version: Version | str = Version.V1_0, text_hidden: int = 64) -> DiTParams:
    """Head dim 128 as in the real model (so RoPE axes are the real 16/56/56), everything else small.

    text_hidden is the Qwen-VL hidden size the connector reads (64 for the tiny Qwen).
    """
    connector = ConnectorParams(in_channels=text_hidden, hidden_size=256, num_heads=2, depth=2)
    return DiTParams(context_in_dim=256, hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1,
                     version=version, connector=connector)


def tiny_dit_state_dict(params: DiTParams, seed: int = 0, text_gain: float = 1.0) -> dict[str, Tensor]:
    """Deterministic random weights: PyTorch's default Linear init, unit norms.

    text_gain scales the pooled-instruction projection. With random weights the instruction barely
    moves the velocity; a gain of ~100 makes cond and uncond differ as in a trained model (per-token
    differences above 1), so normalised CFG actually engages in tests.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Step1XEditDiT(params)
        for name, param in model.named_parameters():
            if name.endswith(".scale"):
                torch.nn.init.ones_(param)
            elif name == "connector.scale_factor":
                torch.nn.init.constant_(param, INITIAL_SCALE_FACTOR)
            elif name == "connector.global_proj_out.weight":
                param.data.mul_(text_gain)
            elif name == "text_token_mapping.weight":  # v1.2: quoted characters as loud as in the trained model
                param.data.mul_(MAPPING_GAIN)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_tiny_dit(path: str | Path, version: Version | str = Version.V1_0, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                   layout: str = "original", text_hidden: int = 64, text_gain: float = 1.0) -> Path:
    """Write a tiny DiT file as the releases store it (bf16 by default; fp8 and fp32 work too)."""
    params = tiny_dit_params(version, text_hidden)
    sd = tiny_dit_state_dict(params, seed, text_gain)
    if layout == "diffusers":
        sd = original_to_diffusers(sd, params)
    elif layout != "original":
        raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    # Every tensor in one dtype, as the releases (and the official fp8 cast of the whole model) do.
    sd = {k: v.to(dtype) for k, v in sd.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "step1x_version": str(params.version), "tiny": "true"})
    return path


def original_to_diffusers(sd: dict[str, Tensor], params: DiTParams) -> dict[str, Tensor]:
    """The diffusers layout of an original-layout state dict (the loader only ever converts the other way)."""
    return diffusers_layout(sd, params.hidden_size)
