"""The FLUX.1 autoencoder's building blocks, named like the keys of BFL's ``ae.safetensors``.

Every layer takes ``dtype``, ``device`` and ``operations`` (a namespace with ``Conv2d`` and
``GroupNorm``, ``torch.nn`` by default) so ComfyUI can inject its ``comfy.ops`` classes.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .params import NORM_EPS, NORM_GROUPS

Operations = Any  # a namespace such as torch.nn or comfy.ops.manual_cast


def group_norm(channels: int, dtype, device, operations: Operations, groups: int = NORM_GROUPS) -> nn.Module:
    return operations.GroupNorm(
        num_groups=groups, num_channels=channels, eps=NORM_EPS, affine=True, dtype=dtype, device=device
    )


class ResnetBlock(nn.Module):
    """Two norm-swish-conv3x3 stages plus a skip; a 1x1 ``nin_shortcut`` only where the width changes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dtype=None,
        device=None,
        operations: Operations = nn,
        groups: int = NORM_GROUPS,
    ) -> None:
        super().__init__()
        conv = dict(dtype=dtype, device=device)
        self.norm1 = group_norm(in_channels, dtype, device, operations, groups)
        self.conv1 = operations.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, **conv)
        self.norm2 = group_norm(out_channels, dtype, device, operations, groups)
        self.conv2 = operations.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, **conv)
        self.nin_shortcut = (
            operations.Conv2d(in_channels, out_channels, kernel_size=1, **conv)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections and a residual."""

    def __init__(self, channels: int, dtype=None, device=None, operations: Operations = nn,
                 groups: int = NORM_GROUPS) -> None:
        super().__init__()
        conv = dict(kernel_size=1, dtype=dtype, device=device)
        self.norm = group_norm(channels, dtype, device, operations, groups)
        self.q = operations.Conv2d(channels, channels, **conv)
        self.k = operations.Conv2d(channels, channels, **conv)
        self.v = operations.Conv2d(channels, channels, **conv)
        self.proj_out = operations.Conv2d(channels, channels, **conv)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        normed = self.norm(x)
        # One head whose width is the channel count, so SDPA scales by 1/sqrt(channels).
        q, k, v = (rearrange(proj(normed), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = rearrange(attended, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv after padding only the right and bottom edges."""

    # (left, right, top, bottom): torch convs pad symmetrically, the checkpoint was trained with this.
    PADDING = (0, 1, 0, 1)

    def __init__(self, channels: int, dtype=None, device=None, operations: Operations = nn) -> None:
        super().__init__()
        self.conv = operations.Conv2d(
            channels, channels, kernel_size=3, stride=2, padding=0, dtype=dtype, device=device
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.PADDING, mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution by nearest-neighbour repetition, then smooth with a 3x3 conv."""

    def __init__(self, channels: int, dtype=None, device=None, operations: Operations = nn) -> None:
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, kernel_size=3, padding=1, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """Lowest-resolution stage shared by encoder and decoder: resnet, attention, resnet."""

    def __init__(self, channels: int, dtype=None, device=None, operations: Operations = nn,
                 groups: int = NORM_GROUPS) -> None:
        super().__init__()
        layer = dict(dtype=dtype, device=device, operations=operations, groups=groups)
        self.block_1 = ResnetBlock(channels, channels, **layer)
        self.attn_1 = AttnBlock(channels, **layer)
        self.block_2 = ResnetBlock(channels, channels, **layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _ResnetStack(nn.Module):
    """``num_blocks`` resnets (the first one changes the width), then the level's resampling layer, if any."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, dtype=None, device=None,
                 operations: Operations = nn, groups: int = NORM_GROUPS) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, dtype=dtype, device=device, operations=operations, groups=groups)
                                   for a, b in zip(widths, widths[1:]))

    def resample(self, x: Tensor) -> Tensor:
        return x

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.resample(x)


class EncoderLevel(_ResnetStack):
    """One encoder resolution: ``block`` resnets, then an optional ``downsample`` (the checkpoint's name)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool, dtype=None,
                 device=None, operations: Operations = nn, groups: int = NORM_GROUPS) -> None:
        super().__init__(in_channels, out_channels, num_blocks, dtype, device, operations, groups)
        self.downsample = Downsample(out_channels, dtype, device, operations) if downsample else None

    def resample(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(_ResnetStack):
    """One decoder resolution: ``block`` resnets, then an optional ``upsample`` (the checkpoint's name)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool, dtype=None,
                 device=None, operations: Operations = nn, groups: int = NORM_GROUPS) -> None:
        super().__init__(in_channels, out_channels, num_blocks, dtype, device, operations, groups)
        self.upsample = Upsample(out_channels, dtype, device, operations) if upsample else None

    def resample(self, x: Tensor) -> Tensor:
        return x if self.upsample is None else self.upsample(x)
