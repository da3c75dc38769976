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

FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


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

    def dequantized_weight(self, like: Tensor) -> Tensor:
        scale = self.scale_weight.to(device=like.device, dtype=torch.float32)
        if scale.ndim == 1:
            scale = scale[:, None]
        weight = self.weight.to(device=like.device, dtype=torch.float32) * scale
        return weight.to(like.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight(x), _cast(self.bias, x))
