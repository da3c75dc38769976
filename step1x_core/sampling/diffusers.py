"""The diffusers pipeline's flow: Step1X-Edit v1.2 edits, and text-to-image with v1.1 and v1.2.

What differs from the official flow (``official``):
- schedule: sigmas ``linspace(1, 1/N, N)`` (float32, numpy), FLUX's exponential shift with
  ``mu = L * m + b`` from the target's token count, then a terminal 0; the model gets ``(1000 sigma) / 1000``
  rounded through the run's dtype;
- guidance: the cond and uncond prompts have their own lengths, so they are two DiT calls; the per-token
  norm rescale is applied while the 0..1000 timestep exceeds the threshold x 1000. The reference compares
  its 0..1000 timestep with 0.93 itself, i.e. rescales at every step: ``REFERENCE_THRESHOLD`` says that on
  the [0, 1] scale;
- Euler: the sample in float32, the step's product in the prediction's dtype;
- noise: drawn from a CPU generator in the run's dtype (the same seed gives the same picture on any device),
  and for edits the VAE posterior is sampled from the same generator first.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .guidance import norm_cfg_divisor
from .latents import latent_shape
from .loop import Guidance

REFERENCE_THRESHOLD = 0.93 / 1000
BASE_TOKENS, MAX_TOKENS, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def shift_mu(image_tokens: int) -> float:
    """diffusers' calculate_shift, in its order of operations (the official ``time_shift_mu``'s line, computed
    as ``L * m + b``)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return image_tokens * slope + (BASE_SHIFT - slope * BASE_TOKENS)


def diffusers_schedule(steps: int, image_tokens: int) -> tuple[Tensor, Tensor]:
    """(sigmas [steps + 1] ending in 0, timesteps [steps] = 1000 sigmas), float32, as the diffusers
    scheduler computes them (the shift in numpy float32)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    mu = shift_mu(image_tokens)
    sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    sigmas = torch.from_numpy(sigmas).to(torch.float32)
    timesteps = sigmas * 1000
    return torch.cat([sigmas, torch.zeros(1)]), timesteps


def cpu_generator(seed: int) -> torch.Generator:
    """The CPU generator the diffusers flow draws from (so a seed gives the same picture on every device)."""
    return torch.Generator().manual_seed(seed)


def cpu_randn(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
              device: torch.device | str) -> Tensor:
    """diffusers' randn_tensor with a CPU generator: drawn on the CPU in ``dtype``, then moved."""
    return torch.randn(shape, generator=generator, device="cpu", dtype=dtype).to(device)


def latent_noise(latent_height: int, latent_width: int, generator: torch.Generator, dtype: torch.dtype,
                 device: torch.device | str) -> Tensor:
    """Initial noise [1, 16, latent_height, latent_width]."""
    return cpu_randn(latent_shape(latent_height, latent_width), generator, dtype, device)


def edit_draws(generator: torch.Generator, latent_height: int, latent_width: int, dtype: torch.dtype,
               device: torch.device | str) -> tuple[Tensor, Tensor]:
    """A v1.2 edit's two draws, in the reference's order: the VAE posterior sample's eps, then the initial noise
    (both [1, 16, latent_height, latent_width]). Reflection rounds keep drawing from the same generator."""
    eps = cpu_randn(latent_shape(latent_height, latent_width), generator, dtype, device)
    return eps, latent_noise(latent_height, latent_width, generator, dtype, device)


def cfg_combine_diffusers(cond: Tensor, uncond: Tensor, scale: float, normalize: bool) -> Tensor:
    """uncond + scale * (cond - uncond) [/ per-token norm divisor], in the diffusers pipeline's order of
    operations (its process_diff_norm is the official divisor, n^0.4 where n > 1, else 1)."""
    if not normalize:
        return uncond + scale * (cond - uncond)
    return uncond + scale * (cond - uncond) / norm_cfg_divisor(cond - uncond)


def euler_step(sample: Tensor, prediction: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """FlowMatchEulerDiscreteScheduler.step: float32 sample, the product in the prediction's dtype."""
    return (sample.to(torch.float32) + (sigma_next - sigma) * prediction).to(prediction.dtype)


class DiffusersFlow:
    """The diffusers scheduler's arithmetic over ``sigmas`` [N + 1] and ``timesteps`` [N] (``diffusers_schedule``)."""

    batched_guidance = False

    def __init__(self, sigmas: Tensor, timesteps: Tensor):
        self.sigmas, self.timesteps = sigmas, timesteps
        self.steps = len(timesteps)

    @classmethod
    def for_image(cls, steps: int, image_tokens: int, device: torch.device | str = "cpu") -> DiffusersFlow:
        sigmas, timesteps = diffusers_schedule(steps, image_tokens)
        return cls(sigmas.to(device), timesteps.to(device))

    def t(self, step: int) -> float:
        return self.timesteps[step].item() / 1000

    def model_time(self, step: int, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self.timesteps[step].expand(batch).to(device, dtype) / 1000

    def guide(self, cond: Tensor, uncond: Tensor, guidance: Guidance, step: int) -> Tensor:
        normalize = self.timesteps[step].item() > guidance.norm_threshold * 1000
        return cfg_combine_diffusers(cond, uncond, guidance.scale, normalize)

    def step(self, sample: Tensor, velocity: Tensor, step: int) -> Tensor:
        return euler_step(sample, velocity, self.sigmas[step], self.sigmas[step + 1])

    def start(self, noise: Tensor, reference: Tensor, strength: float) -> tuple[int, Tensor]:
        """diffusers' img2img: the schedule's last ``strength`` part, from the scheduler's scale_noise
        (sigma noise + (1 - sigma) reference)."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        first = int(max(self.steps - min(self.steps * strength, self.steps), 0))
        if first == 0:
            return 0, noise
        sigma = self.sigmas[first]
        return first, (sigma * noise + (1.0 - sigma) * reference).to(noise.dtype)
