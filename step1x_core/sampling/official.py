"""The official Step1X-Edit code's flow (v1.0 and v1.1 edits).

Its schedule is ``linspace(1, 0, N + 1)`` in float32 with a shift whose mu lies on the line through (256
tokens, 0.5) and (4096 tokens, 1.15); the model gets t itself; cond and uncond (padded to one length) share
one DiT call; the Euler step is ``x + (t_next - t) v`` in the sample's dtype with Python-float times; the
noise comes from a generator on the compute device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .guidance import cfg_combine
from .latents import latent_shape
from .loop import Guidance


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


def img2img_start(timesteps: list[float], strength: float) -> int:
    """Index of the first step to run for an img2img strength in (0, 1] (1 = from pure noise)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return int((1 - strength) * (len(timesteps) - 1))


def get_noise(latent_height: int, latent_width: int, seed: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, batch: int = 1) -> Tensor:
    """Gaussian latent noise [batch, 16, latent_height, latent_width] from a seeded generator on ``device``.

    The official code draws bf16 noise with a CUDA generator; the same seed on another device or
    dtype gives different (equally valid) noise.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(latent_shape(latent_height, latent_width, batch), device=device, dtype=dtype,
                       generator=generator)


class OfficialFlow:
    """The official loop's arithmetic over ``timesteps`` (``get_schedule``'s N + 1 times). ``batched_guidance``
    False runs cond and uncond as two DiT calls (the same numbers up to float rounding; for benchmarks)."""

    def __init__(self, timesteps: list[float], batched_guidance: bool = True):
        self.timesteps = timesteps
        self.steps = len(timesteps) - 1
        self.batched_guidance = batched_guidance

    @classmethod
    def for_image(cls, steps: int, image_tokens: int) -> OfficialFlow:
        return cls(get_schedule(steps, image_tokens))

    def t(self, step: int) -> float:
        return self.timesteps[step]

    def model_time(self, step: int, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.full((batch,), self.timesteps[step], dtype=dtype, device=device)

    def guide(self, cond: Tensor, uncond: Tensor, guidance: Guidance, step: int) -> Tensor:
        return cfg_combine(cond, uncond, guidance.scale, normalize=self.timesteps[step] > guidance.norm_threshold)

    def step(self, sample: Tensor, velocity: Tensor, step: int) -> Tensor:
        return sample + (self.timesteps[step + 1] - self.timesteps[step]) * velocity

    def start(self, noise: Tensor, reference: Tensor, strength: float) -> tuple[int, Tensor]:
        first = img2img_start(self.timesteps, strength)
        if first == 0:
            return 0, noise
        t = self.timesteps[first]
        return first, t * noise + (1.0 - t) * reference
