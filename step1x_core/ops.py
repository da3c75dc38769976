"""Layer namespaces for the `operations=` argument of every layer.

`torch.nn` is the plain path: weights are used in their stored dtype. `manual_cast` keeps weights
in their stored dtype (e.g. float8_e4m3fn) and casts them to the input's dtype and device one layer
at a time, so an fp8 checkpoint runs without ever holding an upcast copy of the whole model.
Inside ComfyUI, `comfy.ops` plays this role instead.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _cast(param: Tensor | None, like: Tensor) -> Tensor | None:
    if param is None:
        return None
    return param.to(device=like.device, dtype=like.dtype, non_blocking=True)


class CastLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, _cast(self.weight, x), _cast(self.bias, x))


class CastLayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)


class CastConv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))


class CastGroupNorm(nn.GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, _cast(self.weight, x), _cast(self.bias, x), self.eps)


manual_cast = SimpleNamespace(Linear=CastLinear, LayerNorm=CastLayerNorm, Conv2d=CastConv2d, GroupNorm=CastGroupNorm)

E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_linear_fits(x: Tensor, weight: Tensor) -> bool:
    """Whether torch._scaled_mm takes these sizes (multiples of 16)."""
    return x.shape[-1] % 16 == 0 and weight.shape[0] % 16 == 0


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """``F.linear`` with a float8_e4m3fn ``weight`` (already on ``x``'s device) multiplied in fp8 by
    ``torch._scaled_mm``; None where it cannot run (weight not e4m3, sizes not multiples of 16).

    The activation is quantised to e4m3 with one dynamic per-tensor scale (its absolute maximum maps to
    448), so large activations are not clipped and small ones keep e4m3's relative precision; the product
    is accumulated in float32 and returned in the input's dtype.
    """
    if weight.dtype != torch.float8_e4m3fn or not fp8_linear_fits(x, weight):
        return None
    rows = x.reshape(-1, x.shape[-1])
    scale = (rows.abs().amax().float() / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    quantised = (rows.float() / scale).to(torch.float8_e4m3fn)
    one = torch.ones((), device=x.device, dtype=torch.float32)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    out = torch._scaled_mm(quantised, weight.t(), scale_a=scale, scale_b=one, out_dtype=out_dtype)
    if bias is not None:  # _scaled_mm takes no bias for float32 outputs
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class Fp8MatmulLinear(CastLinear):
    """An fp8 (float8_e4m3fn) Linear multiplied in fp8 (``fp8_linear``: fp8 tensor cores on Ada, Hopper and
    later GPUs) instead of being cast up first. Other weights and sizes use the per-layer cast. Lossy: it
    is an option, off by default."""

    def forward(self, x: Tensor) -> Tensor:
        out = fp8_linear(x, self.weight.to(x.device, non_blocking=True), _cast(self.bias, x))
        return super().forward(x) if out is None else out


fp8_matmul = SimpleNamespace(Linear=Fp8MatmulLinear, LayerNorm=CastLayerNorm, Conv2d=CastConv2d,
                             GroupNorm=CastGroupNorm)


def fp8_matmul_available(device: torch.device | str) -> bool:
    """Whether ``torch._scaled_mm`` runs fp8 on ``device``: CUDA compute capability 8.9+ (Ada, Hopper,
    Blackwell), or the CPU kernel of recent PyTorch (correct, but not faster there)."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)
    if device.type == "cpu":
        try:
            probe = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
            one = torch.ones(())
            torch._scaled_mm(probe, probe.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError):
            return False
        return True
    return False

# The dtypes a user picks by name (command line, nodes), by torch's own names. "auto" lets the host
# choose (bf16 on CUDA, else float32); ComfyUI's weight_dtype labels (bf16, fp8_e4m3fn_fast) are its own.
COMPUTE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                                                 "float16": torch.float16}
WEIGHT_DTYPES: dict[str, torch.dtype | None] = {"default": None, "bfloat16": torch.bfloat16,
                                                "float8_e4m3fn": torch.float8_e4m3fn}
FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


def to_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; fp8 goes up through float32 (some backends lack direct fp8 -> bf16 kernels)."""
    if t.dtype == dtype:
        return t
    if t.dtype in FP8_DTYPES and dtype not in FP8_DTYPES:
        t = t.to(torch.float32)
    return t.to(dtype)


class ScaledFp8Linear(nn.Linear):
    """A Linear stored as fp8 with a float32 scale, as in ComfyUI's "fp8 scaled" files:
    real weight = stored weight * ``scale_weight`` (a per-tensor scalar, or one value per output row).

    The weight stays fp8 in memory; each call dequantises this one layer in float32 (more exact than
    multiplying in bfloat16) and casts it to the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 scale_shape: tuple[int, ...] = ()) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.register_buffer("scale_weight", torch.ones(scale_shape, device=device, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        weight = dequantize(self.weight.to(x.device, non_blocking=True), self.scale_weight, x.dtype)
        return F.linear(x, weight, _cast(self.bias, x))


def dequantize(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``weight * scale`` computed in float32, returned in ``dtype``; ``scale`` is one value (any shape) or
    one per output row."""
    scale = scale.to(device=weight.device, dtype=torch.float32)
    if scale.numel() > 1:
        scale = scale.reshape(-1, *([1] * (weight.ndim - 1)))
    return (weight.to(torch.float32) * scale).to(dtype)
