"""Classifier-free guidance with Step1X-Edit's normalised variant (the difference rescaled per token)."""

from __future__ import annotations

import torch
from torch import Tensor

# The later official code rescales CFG while t > 0.93; v1.0's code passed 1.0 (never active).
DEFAULT_NORM_CFG_THRESHOLD = 0.93
NORM_CFG_EXPONENT = 0.4


def norm_cfg_divisor(diff: Tensor) -> Tensor:
    """Per-token divisor of normalised CFG: ||diff||^0.4 where the norm (over the last dim) > 1, else 1."""
    norm = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
    return torch.where(norm > 1.0, norm.pow(NORM_CFG_EXPONENT), torch.ones_like(norm))


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float, normalize: bool) -> Tensor:
    """uncond + scale * (cond - uncond) on packed velocity tokens; with `normalize` the difference
    is first divided by `norm_cfg_divisor` (the official code's order of operations)."""
    diff = cond - uncond
    if normalize:
        diff = diff / norm_cfg_divisor(diff)
    return uncond + scale * diff
