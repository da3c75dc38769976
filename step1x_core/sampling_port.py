"""Sampling as the diffusers port runs it: Step1X-Edit v1.2, and text-to-image with v1.1 and v1.2.

What differs from ``sampling.py`` (the official v1.0/v1.1 code):
- schedule: sigmas ``linspace(1, 1/N, N)`` (float32, numpy), FLUX's exponential shift with
  ``mu = L * m + b`` from the target's token count, then a terminal 0; the model gets ``(1000 sigma) / 1000``;
- CFG: the cond and uncond prompts have their own lengths, so they are two DiT calls; the per-token norm
  rescale is applied while the 0..1000 timestep exceeds 0.93, i.e. at every step (``REFERENCE_THRESHOLD``
  expresses that on the [0, 1] scale; the official rule is t > 0.93);
- Euler: the sample in float32, the step's product in the prediction's dtype;
- noise: drawn from a CPU generator in the run's dtype (the same seed gives the same picture on any device),
  and for edits the VAE posterior is sampled from the same generator first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .dit.connector import ConnectorContext
from .finite import NonFiniteError, all_finite
from .sampling import explain_non_finite_step, norm_cfg_divisor
from .vae.params import LATENT_CHANNELS

# The port compares the scheduler's 0..1000 timestep with 0.93: t > 0.93 / 1000 on the [0, 1] scale.
REFERENCE_THRESHOLD = 0.93 / 1000
BASE_TOKENS, MAX_TOKENS, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def shift_mu(image_tokens: int) -> float:
    """diffusers' calculate_shift, in its order of operations."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return image_tokens * slope + (BASE_SHIFT - slope * BASE_TOKENS)


def port_schedule(steps: int, image_tokens: int) -> tuple[Tensor, Tensor]:
    """(sigmas [steps + 1] ending in 0, timesteps [steps] = 1000 sigmas), float32, as the port's scheduler
    computes them (the shift in numpy float32)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    mu = shift_mu(image_tokens)
    sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    sigmas = torch.from_numpy(sigmas).to(torch.float32)
    timesteps = sigmas * 1000
    return torch.cat([sigmas, torch.zeros(1)]), timesteps


def cpu_randn(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
              device: torch.device | str) -> Tensor:
    """The port's randn_tensor with a CPU generator: drawn on the CPU in ``dtype``, then moved."""
    return torch.randn(shape, generator=generator, device="cpu", dtype=dtype).to(device)


def latent_noise(height: int, width: int, generator: torch.Generator, dtype: torch.dtype,
                 device: torch.device | str) -> Tensor:
    """Initial noise [1, 16, 2 (height // 16), 2 (width // 16)] for an image of height x width pixels."""
    return cpu_randn((1, LATENT_CHANNELS, 2 * (height // 16), 2 * (width // 16)), generator, dtype, device)


def port_cfg(cond: Tensor, uncond: Tensor, scale: float, normalize: bool) -> Tensor:
    """uncond + scale * (cond - uncond) [/ per-token norm divisor], in the port's order of operations (the
    divisor is the official one, ``sampling.norm_cfg_divisor``: the port's process_diff_norm is the same
    n^0.4 where n > 1, else 1)."""
    if not normalize:
        return uncond + scale * (cond - uncond)
    return uncond + scale * (cond - uncond) / norm_cfg_divisor(cond - uncond)


def euler_step(sample: Tensor, prediction: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """FlowMatchEulerDiscreteScheduler.step: float32 sample, the product in the prediction's dtype."""
    return (sample.to(torch.float32) + (sigma_next - sigma) * prediction).to(prediction.dtype)


@dataclass
class TextInputs:
    """One prompt as the DiT reads it: the connector context and the text stream's RoPE ids [1, T, 3]."""

    ctx: ConnectorContext
    txt_ids: Tensor


StepCallback = Callable[[int, int, Tensor], None]


def denoise_port(model, target: Tensor, reference: Tensor | None, img_ids: Tensor, cond: TextInputs,
                 uncond: TextInputs | None, sigmas: Tensor, timesteps: Tensor, cfg_scale: float,
                 norm_threshold: float = REFERENCE_THRESHOLD, callback: StepCallback | None = None) -> Tensor:
    """The port's denoising loop on packed target tokens [1, L, 64] (reference tokens appended unchanged at
    every call). ``uncond`` None (or cfg 1) runs the conditional branch alone. Returns the target tokens."""
    n_target = target.shape[1]
    guided = uncond is not None and cfg_scale > 1
    for i, t in enumerate(timesteps):
        img = target if reference is None else torch.cat([target, reference], dim=1)
        timestep = (t.expand(target.shape[0]).to(target.dtype)) / 1000
        pred = model.forward_context(img, img_ids, cond.txt_ids, timestep, cond.ctx)[:, :n_target]
        _stop_if_non_finite(pred, i, len(timesteps), t, img, cond)
        if guided:
            neg = model.forward_context(img, img_ids, uncond.txt_ids, timestep, uncond.ctx)[:, :n_target]
            _stop_if_non_finite(neg, i, len(timesteps), t, img, uncond)
            pred = port_cfg(pred, neg, cfg_scale, normalize=t.item() > norm_threshold * 1000)
        target = euler_step(target, pred, sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback(i, len(timesteps), target)
    return target


def _stop_if_non_finite(pred: Tensor, step: int, total: int, timestep: Tensor, img: Tensor,
                        prompt: TextInputs) -> None:
    """As the official loop does: stop at the first NaN step (it can only end in a broken image), naming the
    input that already held NaN, if any."""
    if not all_finite(pred):
        raise NonFiniteError(explain_non_finite_step(step, total, timestep.item() / 1000, img, prompt.ctx))
