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
