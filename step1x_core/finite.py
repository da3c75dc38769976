"""Finite numbers only: NaN and Inf found where they enter (weights, settings, latents), never an image from them.

The tensor test is one min/max reduction (NaN propagates through both; an Inf shows as the min or max), which
runs at memory speed and allocates nothing the size of the tensor, so loaders call it on every weight while
they cast or assign it. fp8 tensors, which torch cannot reduce, are tested on their bit patterns.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NonFiniteError", "all_finite", "describe_non_finite", "require_finite_number", "require_finite_tensor"]

# fp8 formats: as signed bytes, a value >= this is NaN (e4m3fn) or Inf/NaN (e5m2) with the sign bit clear; as
# unsigned bytes, >= 0x80 + this is the same with the sign bit set (both are the top of their byte range).
_FP8_NON_FINITE = {getattr(torch, name): bits for name, bits in (("float8_e4m3fn", 0x7F), ("float8_e5m2", 0x7C))
                   if hasattr(torch, name)}


class NonFiniteError(ValueError):
    """A NaN or Inf where a finite number is needed; the message names where it was found and the likely cause."""


def all_finite(tensor: Tensor) -> bool:
    """True when no element is NaN or +-Inf (integer and bool tensors always are)."""
    if tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    if tensor.dtype in _FP8_NON_FINITE:
        bits = _FP8_NON_FINITE[tensor.dtype]
        raw = tensor.view(torch.int8)
        return int(raw.amax()) < bits and int(raw.view(torch.uint8).amax()) < 0x80 + bits
    if tensor.is_complex():
        return all_finite(torch.view_as_real(tensor))
    try:
        low, high = torch.aminmax(tensor)
    except (RuntimeError, NotImplementedError):  # a dtype without a min/max kernel here
        return bool(torch.isfinite(tensor.float()).all())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def describe_non_finite(tensor: Tensor) -> str:
    """'3 NaN and 1 Inf among 4,096 values' (only called once something was found: it reads the tensor again)."""
    values = tensor.float() if tensor.dtype in _FP8_NON_FINITE else tensor
    nan = int(torch.isnan(values).sum())
    inf = int(torch.isinf(values).sum())
    parts = [f"{nan:,} NaN"] * bool(nan) + [f"{inf:,} Inf"] * bool(inf)
    return f"{' and '.join(parts) or 'non-finite values'} among {tensor.numel():,} values"


def require_finite_number(name: str, value: float, fix: str = "") -> float:
    """``value`` itself, or a NonFiniteError naming the setting (``nan`` passes every < / > range check)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
        raise NonFiniteError(f"{name} must be a finite number, got {value}" + (f"; {fix}" if fix else ""))
    return value


def require_finite_tensor(what: str, tensor: Tensor, cause: str) -> Tensor:
    """``tensor`` itself, or a NonFiniteError: '{what} holds 3 NaN among ...: {cause}'."""
    if not all_finite(tensor):
        raise NonFiniteError(f"{what} holds {describe_non_finite(tensor)}: {cause}")
    return tensor
