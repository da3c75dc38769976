"""A v1.0/v1.1 edit as the official code runs it: resize -> Qwen-VL embeddings (cond and uncond, one batch) ->
connector context -> VAE-encode the reference (posterior mean) -> seeded noise on the device -> the official
flow -> VAE-decode -> the input's size."""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor

from ..images.sizing import pil_to_tensor, resize_to_level, restore_size, tensor_to_pil
from ..sampling.latents import edit_ids, pack, unpack
from ..sampling.loop import DiTText, StepCallback, denoise
from ..sampling.guidance import DEFAULT_NORM_CFG_THRESHOLD
from ..sampling.official import OfficialFlow, get_noise
from .models import Models
from .settings import EditSettings


@torch.inference_mode()
def encode_prompt(models: Models, instruction: str, image: Tensor, negative: str = "",
                  with_uncond: bool = True) -> tuple[DiTText, DiTText | None]:
    """Qwen-VL embeddings of [instruction, negative] (same image, padded to one length) -> (cond, uncond)."""
    with models.on_device(models.embedder):
        if with_uncond:
            encoded = models.embedder.encode_with_negative(instruction, image[0], negative)
        else:
            encoded = models.embedder([instruction], [image[0]])
    text = models.dit_text(encoded)
    return text.select(0), (text.select(1) if with_uncond else None)


@torch.inference_mode()
def sample(models: Models, cond: DiTText, uncond: DiTText | None, reference: Tensor, settings: EditSettings,
           callback: StepCallback | None = None) -> Tensor:
    """The official flow from seeded noise; returns the edited latent [1, 16, h, w]."""
    _, _, lat_h, lat_w = reference.shape
    noise = get_noise(lat_h, lat_w, settings.seed, device=models.device, dtype=models.dtype)
    target, ref_tokens = pack(noise), pack(reference.to(models.dtype))
    flow = OfficialFlow.for_image(settings.steps, target.shape[1])
    first, target = flow.start(target, ref_tokens, settings.strength)
    img_ids, _ = edit_ids(lat_h, lat_w, 1, models.version, cond.tokens, device=models.device)
    guidance = settings.guidance(DEFAULT_NORM_CFG_THRESHOLD)
    with models.on_device(models.dit):
        out = denoise(models.dit, flow, target, img_ids, cond, uncond, guidance, reference=ref_tokens, first_step=first,
                      new_cache=settings.new_step_cache, callback=callback)
    return unpack(out.float(), lat_h, lat_w)


def edit(models: Models, image: Image.Image, instruction: str, settings: EditSettings,
         callback: StepCallback | None = None) -> Image.Image:
    working = resize_to_level(image, settings.size_level, settings.resample)
    pixels = pil_to_tensor(working)
    cond, uncond = encode_prompt(models, instruction, pixels, settings.negative, settings.cfg_scale != 1.0)
    latent = sample(models, cond, uncond, models.encode_image(pixels), settings, callback)
    result = tensor_to_pil(models.decode(latent))
    return restore_size(result, image.size) if settings.restore_size else result
