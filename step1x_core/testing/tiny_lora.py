"""A tiny random LoRA in the kohya sd-scripts format of the official Step1X-Edit LoRA release.

Keys are `lora_unet_<module path with . as _>.{lora_down.weight, lora_up.weight, alpha}` for every
Linear inside the double and single blocks, e.g. `lora_unet_double_blocks_0_img_attn_qkv`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..dit.params import DiTParams
from ..dit.model import Step1XEditDiT


def lora_target_modules(params: DiTParams) -> dict[str, tuple[int, int]]:
    """Module path -> (in_features, out_features) of every Linear the official LoRA targets."""
    with torch.device("meta"):
        model = Step1XEditDiT(params)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(("double_blocks.", "single_blocks."))}


def write_tiny_lora(path: str | Path, params: DiTParams, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                    scale: float = 0.05) -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in lora_target_modules(params).items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator) * scale
        tensors[f"{key}.lora_up.weight"] = torch.randn(fan_out, rank, generator=generator) * scale
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "tiny": "true"})
    return path
