"""Text-to-image with a v1.1 or v1.2 DiT, as the diffusers pipeline runs it (v1.0 has none in any reference):
the MLLM sees a black square, the default negative prompt is the long one, there are no reference tokens,
and the result is resized to the asked size."""

from __future__ import annotations

from dataclasses import replace

import torch
from PIL import Image

from ..qwen.prompt_v12 import T2I_NEGATIVE_PROMPT
from ..qwen.transformers_versions import AS_TRANSFORMERS_4_54
from ..images.sizing import MAX_SIZE_LEVEL
from ..qwen.embedder import QwenVLEmbedder
from ..qwen.encoding import PromptEncoding
from ..sampling.diffusers import latent_noise
from ..sampling.loop import StepCallback
from ..versions import Version
from .models import Models
from .settings import EditSettings
from .v12_edit import FlowResult, run_flow

# The v1.1 text-to-image reference's MLLM behaviour: transformers 4.55 as its README pins (vision id,
# torchvision resize, 3-D positions); the float32 features are not rounded through a bfloat16 buffer.
V11_T2I_BEHAVIOUR = replace(AS_TRANSFORMERS_4_54, bf16_buffer=False)
V11_MLLM_SIZE = 1024  # the v1.1 reference shows Qwen a black 1024² image whatever the output size
MIN_SIDE = 16


def mllm_image(version: Version, size_level: int = 1024) -> Image.Image:
    """The black square the MLLM sees instead of an input image: 1024² for v1.1, size_level² for v1.2."""
    side = size_level if version.reasoning_prompts else V11_MLLM_SIZE
    return Image.new("RGB", (side, side))


def negative_prompt(negative: str) -> str:
    """An empty negative prompt means the references' long default."""
    return negative or T2I_NEGATIVE_PROMPT


def check_size(version: Version, width: int, height: int) -> None:
    if version is Version.V1_0:
        raise ValueError("text-to-image needs a v1.1 or v1.2 DiT; this one is v1.0")
    if not (MIN_SIDE <= width <= MAX_SIZE_LEVEL and MIN_SIDE <= height <= MAX_SIZE_LEVEL):
        raise ValueError(f"text-to-image sides must be between {MIN_SIDE} and {MAX_SIZE_LEVEL} pixels, got "
                         f"{width}x{height}")


def encode_prompts(embedder: QwenVLEmbedder, prompt: str, negative: str | None, version: Version,
                   size_level: int = 1024) -> list[PromptEncoding]:
    """The prompt (and the negative, None without guidance) as the text-to-image reference of ``version``
    encodes them: v1.2's format, or v1.1's with the reference's MLLM behaviour; both with its black square."""
    image = mllm_image(version, size_level)
    texts = [text for text in (prompt, negative) if text is not None]
    if version.reasoning_prompts:
        return [embedder.encode(text, image, "v1.2") for text in texts]
    behaviour, embedder.behaviour = embedder.behaviour, V11_T2I_BEHAVIOUR
    try:
        return [embedder.encode(text, image, "v1.1") for text in texts]
    finally:
        embedder.behaviour = behaviour


@torch.inference_mode()
def text_to_image(models: Models, prompt: str, width: int, height: int, settings: EditSettings,
                  generator: torch.Generator, callback: StepCallback | None = None) -> FlowResult:
    version = models.dit.params.version
    check_size(version, width, height)
    if settings.strength != 1.0:
        raise ValueError("strength needs an input image to start from; text-to-image starts from noise (leave it at 1)")
    negative = negative_prompt(settings.negative) if settings.cfg_scale > 1 else None
    with models.on_device(models.embedder):
        encodings = encode_prompts(models.embedder, prompt, negative, version, settings.size_level)
    cond, *uncond = [models.dit_text(e) for e in encodings]
    latent_h, latent_w = 2 * (height // 16), 2 * (width // 16)
    noise = latent_noise(latent_h, latent_w, generator, models.dtype, models.device)
    tokens = run_flow(models, settings, noise, cond, uncond[0] if uncond else None, None, callback)
    result = models.decode_rounded(tokens, latent_h, latent_w)
    return FlowResult(result.resize((width, height)) if result.size != (width, height) else result, tokens)
