"""The flows the diffusers port defines: v1.2 edits, and text-to-image with v1.1 and v1.2.

The stages in order, as the reference runs them:
- edit (v1.2): working size (as v1.0/v1.1) -> the MLLM sees the input resized with Lanczos, the VAE the
  input resized with torch bilinear + antialias -> Qwen-VL in v1.2's format (cond, and uncond with the
  same image) -> connector context + mapped quote tokens -> VAE posterior *sampled* (first draw of the
  generator) -> noise (second draw) -> the port's loop (``sampling_port``) -> decode -> rounded to 8 bits
  -> back to the input's size (bicubic);
- text-to-image: the MLLM sees a black square (1024² for v1.1, size_level² for v1.2), the default negative
  prompt is the long one, there are no reference tokens, and the result is resized to the asked size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from . import sampling, sampling_port
from .imaging import resize_to_level, restore_size, tensor_to_pil, to_rgb
from .qwen.embedder_v12 import QwenV12Embedder, V12Encoding
from .qwen.prompt_v12 import T2I_NEGATIVE_PROMPT
from .qwen.transformers_versions import AS_TRANSFORMERS_4_54
from .reasoning.chat import ChatModel
from .reasoning.loop import ReflectionRun, run_reflection
from .reasoning.qwen_chat import QwenChat
from .reasoning.thinker import Rewrite, Thinker
from .sampling_port import TextInputs
from .versions import Version

if TYPE_CHECKING:
    from .pipeline import EditSettings, Step1XEditPipeline

# The port's MLLM behaviour: transformers 4.55 as its README pins (vision id, torchvision resize, 3-D
# positions); the float32 features are not rounded through a bfloat16 buffer (a bf16 run is bf16 anyway).
PORT_V11_BEHAVIOUR = replace(AS_TRANSFORMERS_4_54, bf16_buffer=False)
V11_T2I_MLLM_SIZE = 1024  # the v1.1 port shows Qwen a black 1024² image whatever the output size


@dataclass
class PortResult:
    image: Image.Image
    latent: Tensor  # final packed target tokens [1, L, 64]


def vae_input(image: Image.Image, width: int, height: int) -> Tensor:
    """[1, 3, height, width] in [-1, 1]: the original resized with torch bilinear + antialias (v1.2)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).float().permute(2, 0, 1)[None] / 255.0
    return F.interpolate(pixels, (height, width), mode="bilinear", antialias=True) * 2 - 1


def _v12_inputs(pipe: Step1XEditPipeline, encoding: V12Encoding) -> TextInputs:
    device, dtype = pipe.device, pipe.dtype
    mask = torch.ones(encoding.embedding.shape[:2], dtype=torch.long, device=device)
    ctx = pipe.dit.precompute(encoding.embedding.to(device, dtype), mask, encoding.text_embeds.to(device, dtype),
                              encoding.text_mask.to(device))
    return TextInputs(ctx, encoding.txt_ids[None].to(device))


def _encode_v12(pipe: Step1XEditPipeline, instruction: str, negative: str | None, mllm_image: Image.Image
                ) -> tuple[TextInputs, TextInputs | None]:
    embedder = QwenV12Embedder.from_embedder(pipe.embedder)
    with pipe._on_device(pipe.embedder):
        cond = embedder(instruction, mllm_image)
        uncond = embedder(negative, mllm_image) if negative is not None else None
    with pipe._on_device(pipe.dit):
        return _v12_inputs(pipe, cond), (_v12_inputs(pipe, uncond) if uncond is not None else None)


def _encode_v11(pipe: Step1XEditPipeline, instruction: str, negative: str | None, mllm_image: Image.Image
                ) -> tuple[TextInputs, TextInputs | None]:
    embedder = pipe.embedder
    behaviour, embedder.behaviour = embedder.behaviour, PORT_V11_BEHAVIOUR
    try:
        with pipe._on_device(embedder):
            encoded = [embedder([text], [mllm_image]) for text in (instruction, negative) if text is not None]
    finally:
        embedder.behaviour = behaviour
    inputs = []
    with pipe._on_device(pipe.dit):
        for e in encoded:
            ctx = pipe.dit.precompute(e.embs.to(pipe.device, pipe.dtype), e.masks.to(pipe.device))
            inputs.append(TextInputs(ctx, torch.zeros(1, e.embs.shape[1], 3, device=pipe.device)))
    return inputs[0], (inputs[1] if len(inputs) > 1 else None)


def _decode(pipe: Step1XEditPipeline, tokens: Tensor, latent_h: int, latent_w: int) -> Image.Image:
    latent = sampling.unpack(tokens, latent_h, latent_w)
    with pipe._on_device(pipe.vae):
        decoded = pipe.vae.decode(latent.to(pipe.device, next(pipe.vae.parameters()).dtype))
    return tensor_to_pil((decoded.float() / 2 + 0.5).clamp(0, 1), rounding=True)


def _run(pipe: Step1XEditPipeline, settings: EditSettings, generator: torch.Generator, cond: TextInputs,
         uncond: TextInputs | None, reference: Tensor | None, latent_h: int, latent_w: int, callback=None) -> Tensor:
    version = pipe.dit.params.version
    noise = sampling_port.latent_noise(latent_h * 8, latent_w * 8, generator, pipe.dtype, pipe.device)
    target = sampling.pack(noise)
    img_ids = sampling.image_ids(latent_h, latent_w, 1, device=pipe.device)
    if reference is not None:
        reference_ids = sampling.image_ids(latent_h, latent_w, 1, version.reference_offset, device=pipe.device)
        img_ids = torch.cat([img_ids, reference_ids], dim=1)
    sigmas, timesteps = sampling_port.port_schedule(settings.steps, target.shape[1])
    threshold = sampling_port.REFERENCE_THRESHOLD if settings.norm_cfg_threshold is None else settings.norm_cfg_threshold
    with pipe._on_device(pipe.dit):
        return sampling_port.denoise_port(pipe.dit, target, reference, img_ids, cond, uncond, sigmas.to(pipe.device),
                                          timesteps.to(pipe.device), settings.cfg_scale, threshold, callback)


@torch.inference_mode()
def edit_v12(pipe: Step1XEditPipeline, image: Image.Image, instruction: str, settings: EditSettings,
             generator: torch.Generator, callback=None) -> PortResult:
    """One v1.2 edit; ``generator`` (CPU) is drawn from twice: the VAE posterior sample, then the noise."""
    image = to_rgb(image)
    mllm_image = resize_to_level(image, settings.size_level, "lanczos")
    width, height = mllm_image.size
    negative = settings.negative if settings.cfg_scale > 1 else None
    cond, uncond = _encode_v12(pipe, instruction, negative, mllm_image)
    with pipe._on_device(pipe.vae):
        vae_dtype = next(pipe.vae.parameters()).dtype
        mean, std = pipe.vae.posterior(vae_input(image, width, height).to(pipe.device, vae_dtype))
        # Drawn in the run's dtype, as the reference (whose VAE runs in it) does: the same seed, the same draw.
        sample = mean + std * sampling_port.cpu_randn(tuple(mean.shape), generator, pipe.dtype, pipe.device).to(vae_dtype)
        reference = sampling.pack(pipe.vae.normalise(sample).to(pipe.dtype))
    latent_h, latent_w = mean.shape[-2:]
    tokens = _run(pipe, settings, generator, cond, uncond, reference, latent_h, latent_w, callback)
    result = _decode(pipe, tokens, latent_h, latent_w)
    return PortResult(restore_size(result, image.size) if settings.restore_size else result, tokens)


@torch.inference_mode()
def text_to_image(pipe: Step1XEditPipeline, prompt: str, width: int, height: int, settings: EditSettings,
                  generator: torch.Generator, callback=None) -> PortResult:
    """Text-to-image with a v1.1 or v1.2 DiT (v1.0 has none in any reference)."""
    version = pipe.dit.params.version
    if version is Version.V1_0:
        raise ValueError("text-to-image needs a v1.1 or v1.2 DiT; this one is v1.0")
    if width < 16 or height < 16:
        raise ValueError(f"text-to-image needs a size of at least 16x16 pixels, got {width}x{height}")
    negative = (settings.negative or T2I_NEGATIVE_PROMPT) if settings.cfg_scale > 1 else None
    if version.reasoning_prompts:
        black = Image.new("RGB", (settings.size_level, settings.size_level))
        cond, uncond = _encode_v12(pipe, prompt, negative, black)
    else:
        cond, uncond = _encode_v11(pipe, prompt, negative, Image.new("RGB", (V11_T2I_MLLM_SIZE,) * 2))
    latent_h, latent_w = 2 * (height // 16), 2 * (width // 16)
    tokens = _run(pipe, settings, generator, cond, uncond, None, latent_h, latent_w, callback)
    result = _decode(pipe, tokens, latent_h, latent_w)
    return PortResult(result.resize((width, height)) if result.size != (width, height) else result, tokens)


@dataclass
class ReasonedEdit:
    """A v1.2 edit with thinking and/or reflection: the chosen picture, the instruction the edits used
    (rewritten when thinking was on), and the reflection loop's record (None without reflection)."""

    image: Image.Image
    instruction: str
    run: ReflectionRun | None
    rewrite: Rewrite | None
    latents: list[Tensor]  # each edit's final packed target tokens, in order


class _ChatOnDevice(ChatModel):
    """The thinker's chat with the text encoder moved to the compute device for each call (offloading)."""

    def __init__(self, pipe: Step1XEditPipeline, chat: ChatModel):
        self.pipe, self.inner = pipe, chat

    def chat(self, system, content, *, stage: str = "") -> str:
        with self.pipe._on_device(self.pipe.embedder):
            return self.inner.chat(system, content, stage=stage)


def reasoned_edit_v12(pipe: Step1XEditPipeline, image: Image.Image, instruction: str, settings: EditSettings,
                      chat: ChatModel | None = None, callback=None) -> ReasonedEdit:
    """v1.2's thinking (``settings.think``: the MLLM rewrites the instruction first) and reflection
    (``settings.reflect`` rounds: the MLLM judges each edit and asks for a re-edit or a restart), as the
    reference runs them, but seeded: the edits draw from one CPU generator across rounds (the reference's
    generator), and the MLLM's sampling from ``settings.seed`` (the reference's is unseeded). ``chat``
    replaces the MLLM as the thinker (a scripted judge in tests)."""
    if not pipe.dit.params.version.reasoning_prompts:
        raise ValueError(f"thinking and reflection are v1.2's; this DiT is {pipe.dit.params.version}: load v1.2's DiT "
                         "and its fine-tuned text encoder")
    if chat is None:
        chat = QwenChat(pipe.embedder.model, pipe.embedder.tokenizer, pipe.embedder.image_processor, seed=settings.seed,
                        max_new_tokens=settings.reasoning_tokens)
    thinker = Thinker(_ChatOnDevice(pipe, chat), max_tries=settings.judge_tries)
    generator = port_generator(settings.seed)
    latents: list[Tensor] = []

    def edit(source: Image.Image, text: str) -> Image.Image:
        result = edit_v12(pipe, source, text, settings, generator, callback)
        latents.append(result.latent)
        return result.image

    if settings.reflect:
        run = run_reflection(edit, image, instruction, thinker, rounds=settings.reflect, think=settings.think)
        return ReasonedEdit(run.best_image, run.prompt, run, run.rewrite, latents)
    rewrite = thinker.think(image, instruction)
    return ReasonedEdit(edit(image, rewrite.instruction), rewrite.instruction, None, rewrite, latents)


def port_generator(seed: int) -> torch.Generator:
    """The CPU generator the port draws from (so a seed gives the same picture on every device)."""
    return torch.Generator().manual_seed(seed)
