"""Masked edits: paste the edited area back into the original at full resolution.

Outside the mask the result is the original's own pixels, exactly (no VAE round trip, no resize); inside,
the edit, with a soft edge that fades in over ``feather`` pixels so no seam shows. Masks are [B, H, W]
in [0, 1] (1 = edit here), images [B, H, W, C] in [0, 1] (ComfyUI's layouts).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def _box_blur(mask: Tensor, radius: int) -> Tensor:
    """Mean over a (2r+1)² box, as two 1-D passes; the image's border does not count as outside."""
    x = mask[:, None]
    x = F.avg_pool2d(x, (1, 2 * radius + 1), stride=1, padding=(0, radius), count_include_pad=False)
    x = F.avg_pool2d(x, (2 * radius + 1, 1), stride=1, padding=(radius, 0), count_include_pad=False)
    return x[:, 0]


def feather_inward(mask: Tensor, radius: int) -> Tensor:
    """The mask with its edge softened inward: it ramps from 0 at the mask's border to full strength
    ``radius`` pixels inside (a straight edge's box blur is 0.5 on the border, 1 at depth r, so 2·blur − 1
    is that ramp); wherever ``mask`` is 0 the result is exactly 0."""
    if radius < 0:
        raise ValueError(f"feather must be >= 0 pixels, got {radius}")
    if radius == 0:
        return mask
    return (2 * _box_blur(mask, radius) - 1).clamp(0, 1) * mask


def resize_mask(mask: Tensor, height: int, width: int) -> Tensor:
    """[B, h, w] -> [B, height, width], bilinear (a painted mask's soft values survive)."""
    if mask.ndim == 2:
        mask = mask[None]
    if tuple(mask.shape[-2:]) == (height, width):
        return mask.float()
    return F.interpolate(mask[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def paste_masked(original: Tensor, edited: Tensor, mask: Tensor) -> Tensor:
    """original * (1 - mask) + edited * mask; images [B, H, W, C], mask [B, H, W] already at their size.
    Where the mask is 0 the original's values come back bit for bit."""
    weight = mask[..., None].to(original.dtype)
    return original * (1 - weight) + edited.to(original.dtype) * weight
