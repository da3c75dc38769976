"""Sampling for Step1X-Edit as free functions: noise, packing, position ids, the shifted schedule,
(normalised) CFG and the Euler loop over the rectified-flow velocity.

The model knows nothing of this module; ComfyUI drives the same model with its own samplers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from einops import rearrange
from torch import Tensor

from .finite import NonFiniteError, all_finite, describe_non_finite
from .vae.params import LATENT_CHANNELS
from .versions import Version
from .dit.connector import ConnectorContext

if TYPE_CHECKING:
    from .dit.model import StepCache

# The later official code rescales CFG while t > 0.93; v1.0's code passed 1.0 (never active).
DEFAULT_NORM_CFG_THRESHOLD = 0.93
NORM_CFG_EXPONENT = 0.4


def get_noise(latent_height: int, latent_width: int, seed: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, batch: int = 1) -> Tensor:
    """Gaussian latent noise [batch, 16, latent_height, latent_width] from a seeded generator.

    The official code draws bf16 noise with a CUDA generator; the same seed on another device or
    dtype gives different (equally valid) noise.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(batch, LATENT_CHANNELS, latent_height, latent_width, device=device, dtype=dtype,
                       generator=generator)


def pack(latent: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4]: one token per 2x2 patch, features (c, py, px)."""
    return rearrange(latent, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(tokens: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """Inverse of `pack` for a latent of the given size (in latent pixels)."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)",
                     h=math.ceil(latent_height / 2), w=math.ceil(latent_width / 2), ph=2, pw=2)


def image_ids(latent_height: int, latent_width: int, batch: int, offset: tuple[int, int, int] = (0, 0, 0),
              device: torch.device | str | None = None) -> Tensor:
    """3-axis position ids [batch, L, 3] = (offset0, row + offset1, col + offset2) per token."""
    h, w = latent_height // 2, latent_width // 2
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 0] = offset[0]
    ids[..., 1] = torch.arange(h, device=device)[:, None] + offset[1]
    ids[..., 2] = torch.arange(w, device=device)[None, :] + offset[2]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1)


def edit_ids(latent_height: int, latent_width: int, batch: int, version: Version | str, text_tokens: int,
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """(img_ids for [target | reference], txt_ids of zeros)."""
    target = image_ids(latent_height, latent_width, batch, device=device)
    reference = image_ids(latent_height, latent_width, batch, Version.parse(version).reference_offset,
                          device=device)
    return torch.cat([target, reference], dim=1), torch.zeros(batch, text_tokens, 3, device=device)


def time_shift_mu(image_tokens: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu on the line through (256 tokens, base_shift) and (4096 tokens, max_shift), extrapolated."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return base_shift + slope * (image_tokens - 256)


def get_schedule(num_steps: int, image_tokens: int, shift: bool = True) -> list[float]:
    """num_steps + 1 times from 1 to 0, shifted towards 1 for larger images.

    Computed in float32 like the official code, so the same floats come out.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = time_shift_mu(image_tokens)
        t = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    return t.tolist()


def norm_cfg_divisor(diff: Tensor) -> Tensor:
    """Per-token divisor of normalised CFG: ||diff||^0.4 where the norm (over the last dim) > 1, else 1."""
    norm = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
    return torch.where(norm > 1.0, norm.pow(NORM_CFG_EXPONENT), torch.ones_like(norm))


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float, normalize: bool) -> Tensor:
    """uncond + scale * (cond - uncond) on packed velocity tokens; with `normalize` the difference
    is first divided by `norm_cfg_divisor` (Step1X-Edit's normalised CFG)."""
    diff = cond - uncond
    if normalize:
        diff = diff / norm_cfg_divisor(diff)
    return uncond + scale * diff


class VelocityModel(Protocol):
    def forward_context(self, img: Tensor, img_ids: Tensor, txt_ids: Tensor, timesteps: Tensor,
                        ctx: ConnectorContext, t_vec: Tensor | None = None,
                        cache: StepCache | None = None) -> Tensor: ...


StepCallback = Callable[[int, int, Tensor], None]  # (step index, total steps, current target tokens)


def denoise(model: VelocityModel, target: Tensor, reference: Tensor, img_ids: Tensor, txt_ids: Tensor,
            ctx: ConnectorContext, timesteps: list[float], cfg_scale: float = 6.0,
            norm_cfg_threshold: float = DEFAULT_NORM_CFG_THRESHOLD,
            callback: StepCallback | None = None, cfg_steps: int | None = None,
            cache: StepCache | None = None) -> Tensor:
    """Euler integration of the flow from timesteps[0] to timesteps[-1].

    target, reference: packed tokens [1, L, 64]. ctx holds the connector context for the batch
    [cond, uncond] when cfg_scale != 1 (one DiT call per step), else for [cond] alone.
    Reference tokens are put back unchanged before every step. Returns the target tokens.
    cfg_steps (optional, lossy): run CFG on the first cfg_steps steps only, then the conditional
    branch alone (CFG truncation). cache: an optional first-block `StepCache` (lossy).
    """
    use_cfg = cfg_scale != 1.0
    n_target = target.shape[1]
    total = len(timesteps) - 1
    for i, (t_curr, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        guided = use_cfg and (cfg_steps is None or i < cfg_steps)
        batch = 2 if guided else 1
        if use_cfg and not guided and i == cfg_steps:  # leave the [cond, uncond] batch for good
            ctx, img_ids, txt_ids, cache = ctx.select(0), img_ids[:1], txt_ids[:1], None
        img = torch.cat([target.expand(batch, -1, -1), reference.expand(batch, -1, -1)], dim=1)
        t_vec = torch.full((batch,), t_curr, dtype=target.dtype, device=target.device)
        pred = model.forward_context(img, img_ids, txt_ids, t_vec, ctx, cache=cache)[:, :n_target]
        if not all_finite(pred):  # stop at once: a NaN step can only end in a black image
            raise NonFiniteError(explain_non_finite_step(i, total, t_curr, img, ctx))
        if guided:
            pred = cfg_combine(pred[:1], pred[1:], cfg_scale, normalize=t_curr > norm_cfg_threshold)
        target = target + (t_next - t_curr) * pred
        if callback is not None:
            callback(i, total, target)
    return target


def explain_non_finite_step(step: int, total: int, t: float, img: Tensor, ctx: ConnectorContext) -> str:
    """Why the DiT's velocity at ``step`` holds NaN/Inf, from which of its inputs already did."""
    where = f"step {step + 1} of {total} (t={t:.3f})"
    if not all_finite(img):
        return (f"{where}: the latent entering the DiT holds {describe_non_finite(img)}; the likely cause is the "
                "reference latent (the VAE encode of the input image) or the starting latent")
    if not all(all_finite(part) for part in (ctx.tokens, ctx.context, ctx.y)):
        return (f"{where}: the instruction's conditioning holds NaN/Inf; the likely cause is the text encoder's "
                "output (float16 overflows: use bfloat16 or float32)")
    return (f"{where}: the DiT's velocity holds NaN/Inf although its inputs were finite; the likely cause is the "
            "DiT's arithmetic (float16 overflows: use bfloat16 or float32) or weights changed after they were "
            "loaded and checked")


def img2img_start(timesteps: list[float], strength: float) -> int:
    """Index of the first step to run for an img2img strength in (0, 1] (1 = from pure noise)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return int((1 - strength) * (len(timesteps) - 1))
