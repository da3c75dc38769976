"""Attention backends for the DiT.

Every backend has ComfyUI's `optimized_attention` calling convention with `skip_reshape=True`:
q, k, v are [B, heads, L, head_dim] and the result is [B, L, heads * head_dim]. That lets ComfyUI
pass its own function (so `--use-sage-attention` etc. apply) while the standalone engine uses
flash-attn where it can run and PyTorch SDPA everywhere else.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)


class AttentionFn(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None,
                 skip_reshape: bool = True, **kwargs) -> Tensor: ...


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None,
                   skip_reshape: bool = True, **kwargs) -> Tensor:
    """PyTorch scaled-dot-product attention; `mask` is boolean (True = attend) or additive."""
    if not skip_reshape:
        raise ValueError("step1x_core attention expects q, k, v as [B, heads, L, head_dim]")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _load_flash_attn() -> Callable | None:
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


_flash_attn_func = _load_flash_attn()


def flash_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None,
                    skip_reshape: bool = True, **kwargs) -> Tensor:
    """flash-attn 2 (what the official DiT uses); falls back to SDPA where it cannot run."""
    if _flash_attn_func is None or mask is not None or q.device.type != "cuda" \
            or q.dtype not in (torch.float16, torch.bfloat16):
        return sdpa_attention(q, k, v, heads, mask=mask, skip_reshape=skip_reshape)
    out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.reshape(out.shape[0], out.shape[1], -1)


def default_attention() -> AttentionFn:
    """flash-attn when installed (it still falls back per call off CUDA), else SDPA."""
    return flash_attention if _flash_attn_func is not None else sdpa_attention


def attention_backend(name: str) -> AttentionFn:
    """Resolve a user-facing backend name: "auto", "sdpa" or "flash"."""
    if name == "auto":
        return default_attention()
    if name == "sdpa":
        return sdpa_attention
    if name == "flash":
        if _flash_attn_func is None:
            raise ValueError("attention 'flash' needs the flash-attn package: pip install 'step1x-edit[flash]'")
        return flash_attention
    raise ValueError(f"unknown attention backend {name!r}; choose auto, sdpa or flash")
