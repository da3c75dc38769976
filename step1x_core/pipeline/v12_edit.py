"""A v1.2 edit as the diffusers pipeline runs it: working size (as v1.0/v1.1) -> the MLLM sees the input
resized with Lanczos, the VAE the input resized with torch bilinear + antialias -> Qwen-VL in v1.2's format
(cond, and uncond with the same image; each its own length) -> connector context + mapped quote tokens -> VAE
posterior *sampled* (first draw of the generator) -> noise (second draw) -> the diffusers flow -> decode ->
rounded to 8 bits -> back to the input's size (bicubic)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..images.reading import to_rgb
from ..images.sizing import resize_to_level, restore_size
from ..sampling.diffusers import REFERENCE_THRESHOLD, DiffusersFlow, edit_draws
from ..sampling.latents import pack, target_ids
from ..sampling.loop import DiTText, StepCallback, denoise
from .models import Models
from .settings import EditSettings


@dataclass
class FlowResult:
    image: Image.Image
    latent: Tensor  # final packed target tokens [1, L, 64]


def vae_input(image: Image.Image, width: int, height: int) -> Tensor:
    """[1, 3, height, width] in [-1, 1]: the original resized with torch bilinear + antialias (v1.2)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).float().permute(2, 0, 1)[None] / 255.0
    return F.interpolate(pixels, (height, width), mode="bilinear", antialias=True) * 2 - 1


def encode_v12(models: Models, instruction: str, negative: str | None, mllm_image: Image.Image
               ) -> tuple[DiTText, DiTText | None]:
    """The instruction (and the negative prompt, None without guidance) in v1.2's format, each its own length."""
    with models.on_device(models.embedder):
        encodings = [models.embedder.encode(text, mllm_image, "v1.2") for text in (instruction, negative)
                     if text is not None]
    texts = [models.dit_text(e) for e in encodings]
    return texts[0], (texts[1] if len(texts) > 1 else None)


def run_flow(models: Models, settings: EditSettings, noise: Tensor, cond: DiTText, uncond: DiTText | None,
             reference: Tensor | None, callback: StepCallback | None = None) -> Tensor:
    """Noise [1, 16, h, w] -> the diffusers flow; returns the final packed target tokens."""
    latent_h, latent_w = noise.shape[-2:]
    target = pack(noise)
    flow = DiffusersFlow.for_image(settings.steps, target.shape[1], models.device)
    first = 0
    if reference is not None:
        first, target = flow.start(target, reference, settings.strength)
    img_ids = target_ids(latent_h, latent_w, 1, models.version if reference is not None else None, models.device)
    with models.on_device(models.dit):
        return denoise(models.dit, flow, target, img_ids, cond, uncond, settings.guidance(REFERENCE_THRESHOLD),
                       reference=reference, first_step=first, new_cache=settings.new_step_cache, callback=callback)


@torch.inference_mode()
def edit_v12(models: Models, image: Image.Image, instruction: str, settings: EditSettings,
             generator: torch.Generator, callback: StepCallback | None = None) -> FlowResult:
    """One v1.2 edit; ``generator`` (CPU) is drawn from twice: the VAE posterior sample, then the noise."""
    image = to_rgb(image)
    mllm_image = resize_to_level(image, settings.size_level, "lanczos")
    width, height = mllm_image.size
    negative = settings.negative if settings.cfg_scale > 1 else None
    cond, uncond = encode_v12(models, instruction, negative, mllm_image)
    with models.on_device(models.vae):
        vae_dtype = next(models.vae.parameters()).dtype
        mean, std = models.vae.posterior(vae_input(image, width, height).to(models.device, vae_dtype))
        latent_h, latent_w = mean.shape[-2:]
        # Drawn in the run's dtype, as the reference (whose VAE runs in it) does: the same seed, the same draws.
        eps, noise = edit_draws(generator, latent_h, latent_w, models.dtype, models.device)
        reference = pack(models.vae.normalise(mean + std * eps.to(vae_dtype)).to(models.dtype))
    tokens = run_flow(models, settings, noise, cond, uncond, reference, callback)
    result = models.decode_rounded(tokens, latent_h, latent_w)
    return FlowResult(restore_size(result, image.size) if settings.restore_size else result, tokens)
