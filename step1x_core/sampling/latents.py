"""Latents as the DiT reads them: one token per 2x2 patch, with 3-axis position ids."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from ..vae.params import LATENT_CHANNELS
from ..versions import Version


def pack(latent: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4]: one token per 2x2 patch, features (c, py, px)."""
    return rearrange(latent, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(tokens: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """Inverse of `pack` for a latent of the given size (in latent pixels)."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)",
                     h=math.ceil(latent_height / 2), w=math.ceil(latent_width / 2), ph=2, pw=2)


def latent_shape(latent_height: int, latent_width: int, batch: int = 1) -> tuple[int, int, int, int]:
    return batch, LATENT_CHANNELS, latent_height, latent_width


def image_ids(latent_height: int, latent_width: int, batch: int, offset: tuple[int, int, int] = (0, 0, 0),
              device: torch.device | str | None = None) -> Tensor:
    """3-axis position ids [batch, L, 3] = (offset0, row + offset1, col + offset2) per token."""
    h, w = latent_height // 2, latent_width // 2
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 0] = offset[0]
    ids[..., 1] = torch.arange(h, device=device)[:, None] + offset[1]
    ids[..., 2] = torch.arange(w, device=device)[None, :] + offset[2]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1)


def target_ids(latent_height: int, latent_width: int, batch: int, version: Version | str | None,
               device: torch.device | str | None = None) -> Tensor:
    """The ids of [target] (``version`` None: text-to-image) or of [target | reference] (an edit: the
    reference at the version's offset)."""
    target = image_ids(latent_height, latent_width, batch, device=device)
    if version is None:
        return target
    reference = image_ids(latent_height, latent_width, batch, Version.parse(version).reference_offset, device=device)
    return torch.cat([target, reference], dim=1)


def edit_ids(latent_height: int, latent_width: int, batch: int, version: Version | str, text_tokens: int,
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """(img_ids for [target | reference], txt_ids of zeros): the official v1.0/v1.1 text stream has no positions."""
    return (target_ids(latent_height, latent_width, batch, version, device=device),
            torch.zeros(batch, text_tokens, 3, device=device))
