"""Step1XEditPipeline: image + instruction -> edited image, standalone (no ComfyUI).

The data flow of a v1.0/v1.1 edit, one stage per method: resize -> Qwen-VL embeddings (cond and uncond) ->
connector context -> VAE-encode the reference -> noise + schedule -> Euler loop -> VAE-decode -> original
size. A v1.2 edit and text-to-image follow the diffusers port instead (``pipeline_port``).
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image
from torch import Tensor, nn

from . import sampling
from .dit.attention import attention_backend
from .compatibility import check_encoder_width, encoder_width
from .dit.checkpoint import LoadedCheckpoint, load_dit, read_dit_checkpoint
from .dit.connector import ConnectorContext
from .imaging import MULTIPLE, pil_to_tensor, resample_filter, resize_to_level, restore_size, tensor_to_pil, to_rgb
from .dit.model import StepCache, Step1XEditDiT
from .finite import require_finite_number, require_finite_tensor
from .ops import fp8_matmul_available
from .pipeline_port import ReasonedEdit, edit_v12, port_generator, reasoned_edit_v12, text_to_image
from .qwen.embedder import QwenVLEmbedder
from .qwen.prompt import EMPTY_INSTRUCTION_WARNING
from .vae.loader import load_vae
from .vae.model import AutoEncoder

logger = logging.getLogger(__name__)

VAE_CAUSE = ("the VAE's numbers (its weights were checked when loaded; a float16 VAE overflows: it runs in "
             "float32 here)")


@dataclass
class EditSettings:
    steps: int = 28
    cfg_scale: float = 6.0
    seed: int = 0
    size_level: int = 1024
    negative: str = ""
    # CFG is rescaled per token while t (in [0, 1]) > this; 1.0 = never (v1.0's code). None: the version's
    # reference, 0.93 for v1.0/v1.1 edits (the later official code), every step (0.00093) for v1.2 and
    # text-to-image, whose reference compares its 0..1000 timestep with 0.93.
    norm_cfg_threshold: float | None = None
    strength: float = 1.0  # img2img: < 1 starts from the noised input image
    resample: str = "bicubic"  # input resize filter: bicubic (v1.0) or lanczos (later code)
    restore_size: bool = True  # v1.0 resizes the result back to the input's size
    # Speed options, off by default because they change the result (measured by step1x_core.commands.bench):
    cfg_steps: int | None = None  # CFG on the first N steps only, then the conditional branch alone
    step_cache: float | None = None  # first-block step cache threshold (e.g. 0.05)
    # v1.2 only: the MLLM rewrites the instruction first (think), judges each edit and re-edits for up to
    # `reflect` rounds (the reference's default when on: 3; 0 = off).
    think: bool = False
    reflect: int = 0
    # The reference's judging budget: tries per judge stage before its fallback verdict, and new tokens per
    # MLLM answer. Lower values trade the judge's reliability for speed.
    judge_tries: int = 20
    reasoning_tokens: int = 128

    def validate(self) -> None:
        # NaN passes every < and > below (all comparisons with it are false): refuse it by name first.
        for name in ("cfg_scale", "strength", "norm_cfg_threshold", "step_cache"):
            require_finite_number(name, getattr(self, name))
        for name in ("steps", "size_level", "seed", "cfg_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be between 0 and 2**64 - 1, got {self.seed}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.cfg_scale < 1.0:
            raise ValueError(f"cfg must be >= 1.0 (1 disables guidance), got {self.cfg_scale}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.size_level < MULTIPLE:
            raise ValueError(f"size_level must be at least {MULTIPLE}, got {self.size_level}")
        resample_filter(self.resample)
        if self.cfg_steps is not None and self.cfg_steps < 0:
            raise ValueError(f"cfg_steps must be >= 0, got {self.cfg_steps}")
        if self.step_cache is not None and self.step_cache <= 0:
            raise ValueError(f"step_cache threshold must be > 0, got {self.step_cache}")
        if self.reflect < 0:
            raise ValueError(f"reflect must be >= 0 rounds (0 = off), got {self.reflect}")
        if self.judge_tries < 1 or self.reasoning_tokens < 1:
            raise ValueError(f"judge_tries and reasoning_tokens must be at least 1, got {self.judge_tries} and "
                             f"{self.reasoning_tokens}")
        if self.norm_cfg_threshold is not None and not 0.0 <= self.norm_cfg_threshold <= 1.0:
            raise ValueError(f"norm_cfg_threshold must be in [0, 1] (t's scale), got {self.norm_cfg_threshold}")

    def unsupported_by_the_port(self) -> list[str]:
        """Options of the official v1.0/v1.1 loop that a v1.2 edit or text-to-image does not have."""
        defaults = EditSettings()
        return [name for name in ("strength", "cfg_steps", "step_cache")
                if getattr(self, name) != getattr(defaults, name)]

    @property
    def reasoning(self) -> bool:
        return self.think or self.reflect > 0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the official code runs it (CUDA); float32 on CPU, where bf16 is slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_dit_for(dit_path: str | Path | LoadedCheckpoint, device: torch.device, dtype: torch.dtype,
                 weight_dtype: torch.dtype | None = None, version: str | None = None, attention: str = "auto",
                 offload: bool = False, compile_blocks: bool = False, fp8_matmul: bool = False) -> Step1XEditDiT:
    """The DiT (a file, folder, or checkpoint read with ``read_dit_checkpoint``) as a pipeline on `device` in
    `dtype` runs it (see ``Step1XEditPipeline.from_files``)."""
    if fp8_matmul and not fp8_matmul_available(device):
        raise ValueError(f"fp8 matmul is not available on {device}: it needs torch._scaled_mm with fp8 "
                         "support (a CUDA GPU of compute capability 8.9 or newer: Ada, Hopper, Blackwell)")
    home = torch.device("cpu") if offload else device
    dit = load_dit(dit_path, dtype=weight_dtype or dtype, device=home, version=version,
                   attn_fn=attention_backend(attention), fp8_matmul=fp8_matmul)
    if compile_blocks:
        dit.compile_blocks()
    return dit


class Step1XEditPipeline:
    def __init__(self, dit: Step1XEditDiT, vae: AutoEncoder, embedder: QwenVLEmbedder,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, offload: bool = False):
        check_encoder_width(embedder.hidden_size, dit.params.connector.in_channels)
        self.dit, self.vae, self.embedder = dit, vae, embedder
        self.device, self.dtype, self.offload = torch.device(device), dtype, offload

    @classmethod
    def from_files(cls, dit_path: str | Path, vae_path: str | Path, qwen_path: str | Path,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   weight_dtype: torch.dtype | None = None, version: str | None = None,
                   attention: str = "auto", offload: bool = False, compile_blocks: bool = False,
                   fp8_matmul: bool = False, reasoning: bool = False) -> Step1XEditPipeline:
        """Load the three parts from local files. `weight_dtype` may be float8_e4m3fn (storage only, or with
        `fp8_matmul` multiplied in fp8). `qwen_path` is the Qwen2.5-VL folder or ComfyUI's single file.
        `reasoning`: keep the text encoder's LM head, for v1.2's thinking and reflection."""
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        home = torch.device("cpu") if offload else device
        # Each file is checked before it is built (names, shapes, dtypes; NaN/Inf while casting), the DiT first
        # and from its header alone, so that an encoder that does not fit it is named before anything loads.
        checkpoint = read_dit_checkpoint(dit_path, version)
        check_encoder_width(encoder_width(qwen_path), checkpoint.params.connector.in_channels,
                            f"the text encoder {Path(qwen_path).name}", f"the DiT {checkpoint.file_name}")
        vae = load_vae(vae_path, device=home, dtype=torch.float32)
        embedder = QwenVLEmbedder.from_pretrained(qwen_path, dtype=dtype, device=home, keep_lm_head=reasoning)
        dit = load_dit_for(checkpoint, device, dtype, weight_dtype=weight_dtype, attention=attention,
                           offload=offload, compile_blocks=compile_blocks, fp8_matmul=fp8_matmul)
        return cls(dit, vae, embedder, device=device, dtype=dtype, offload=offload)

    def with_dit(self, dit: Step1XEditDiT) -> Step1XEditPipeline:
        """This pipeline's VAE and encoder with another DiT (a batch mixing versions loads them once)."""
        return type(self)(dit, self.vae, self.embedder, device=self.device, dtype=self.dtype, offload=self.offload)

    @property
    def version(self) -> str:
        return self.dit.params.version

    @contextlib.contextmanager
    def _on_device(self, module: nn.Module | QwenVLEmbedder) -> Iterator[None]:
        """With offload, a model visits the compute device only for its own stage.

        Not accelerate's ``cpu_offload_with_hook``: its hook moves a model when that model's ``forward``
        runs, but these stages enter through ``encode``/``decode``, the connector's ``precompute`` and
        transformers' inner backbone, so it would take hooks on five inner modules, chained and released
        by hand, to make the same moves this block makes explicitly (same transfers, same peak memory).
        """
        if not self.offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.inference_mode()
    def encode_prompt(self, instruction: str, image: Tensor, negative: str = "",
                      with_uncond: bool = True) -> ConnectorContext:
        """Qwen-VL embeddings of [instruction, negative] (same image) -> connector context."""
        with self._on_device(self.embedder):
            if with_uncond:
                encoded = self.embedder.encode_with_negative(instruction, image[0], negative)
            else:
                encoded = self.embedder([instruction], [image[0]])
        with self._on_device(self.dit.connector):
            ctx = self.dit.connector.precompute(encoded.embs.to(self.device, self.dtype), encoded.masks.to(self.device))
        for part in (ctx.tokens, ctx.context, ctx.y):
            require_finite_tensor("the connector's output", part, "the DiT's connector weights or the compute "
                                  "dtype (float16 overflows: use bfloat16 or float32)")
        return ctx

    @torch.inference_mode()
    def encode_image(self, image: Tensor) -> Tensor:
        """[1, 3, H, W] in [0, 1] -> scaled latent [1, 16, H/8, W/8] (posterior mean)."""
        require_finite_tensor("the input image", image, "its pixels must be finite numbers")
        with self._on_device(self.vae):
            latent = self.vae.encode(image.to(self.device, torch.float32) * 2 - 1)
        return require_finite_tensor("the VAE's latent of the input image", latent, VAE_CAUSE)

    @torch.inference_mode()
    def decode(self, latent: Tensor) -> Tensor:
        with self._on_device(self.vae):
            pixels = self.vae.decode(latent.to(self.device, torch.float32))
        return (require_finite_tensor("the decoded image", pixels, VAE_CAUSE).clamp(-1, 1) + 1) / 2

    @torch.inference_mode()
    def sample(self, ctx: ConnectorContext, reference: Tensor, settings: EditSettings,
               callback: sampling.StepCallback | None = None) -> Tensor:
        """The Euler loop from seeded noise; returns the edited latent [1, 16, h, w]."""
        _, _, lat_h, lat_w = reference.shape
        noise = sampling.get_noise(lat_h, lat_w, settings.seed, device=self.device, dtype=self.dtype)
        target, ref_tokens = sampling.pack(noise), sampling.pack(reference.to(self.dtype))
        timesteps = sampling.get_schedule(settings.steps, target.shape[1])
        if settings.strength < 1.0:
            start = sampling.img2img_start(timesteps, settings.strength)
            t = timesteps[start]
            timesteps = timesteps[start:]
            target = t * target + (1.0 - t) * ref_tokens
        batch = ctx.y.shape[0]
        img_ids, txt_ids = sampling.edit_ids(lat_h, lat_w, batch, self.version, ctx.tokens.shape[1], device=self.device)
        with self._on_device(self.dit):
            cache = StepCache(settings.step_cache) if settings.step_cache else None
            threshold = settings.norm_cfg_threshold
            out = sampling.denoise(self.dit, target, ref_tokens, img_ids, txt_ids, ctx, timesteps,
                                   cfg_scale=settings.cfg_scale,
                                   norm_cfg_threshold=sampling.DEFAULT_NORM_CFG_THRESHOLD if threshold is None else threshold,
                                   callback=callback, cfg_steps=settings.cfg_steps, cache=cache)
        return sampling.unpack(out.float(), lat_h, lat_w)

    def __call__(self, image: Image.Image, instruction: str, settings: EditSettings | None = None,
                 callback: sampling.StepCallback | None = None) -> Image.Image:
        """Edit ``image`` as ``instruction`` says (the flow of the DiT's version)."""
        settings = settings or EditSettings()
        settings.validate()
        if not instruction.strip():
            logger.warning(EMPTY_INSTRUCTION_WARNING)
        image = to_rgb(image)
        if settings.reasoning:
            return self.reason(image, instruction, settings, callback=callback).image
        if self.dit.params.version.reasoning_prompts:
            self._require_port_settings(settings, "a v1.2 edit")
            return edit_v12(self, image, instruction, settings, port_generator(settings.seed), callback).image
        working = resize_to_level(image, settings.size_level, settings.resample)
        pixels = pil_to_tensor(working)
        ctx = self.encode_prompt(instruction, pixels, settings.negative, with_uncond=settings.cfg_scale != 1.0)
        reference = self.encode_image(pixels)
        latent = self.sample(ctx, reference, settings, callback)
        result = tensor_to_pil(self.decode(latent))
        return restore_size(result, image.size) if settings.restore_size else result

    def generate(self, prompt: str, width: int = 1024, height: int = 1024, settings: EditSettings | None = None,
                 callback: sampling.StepCallback | None = None) -> Image.Image:
        """Text-to-image with a v1.1 or v1.2 DiT: a ``width`` x ``height`` picture of ``prompt`` (sides are
        worked at multiples of 16 and the result resized to the size asked). ``settings.negative`` empty
        means the reference's long default negative prompt."""
        settings = settings or EditSettings()
        settings.validate()
        self._require_port_settings(settings, "text-to-image")
        return text_to_image(self, prompt, width, height, settings, port_generator(settings.seed), callback).image

    def reason(self, image: Image.Image, instruction: str, settings: EditSettings, chat=None,
               callback: sampling.StepCallback | None = None) -> ReasonedEdit:
        """A v1.2 edit with thinking and/or reflection (``settings.think``, ``settings.reflect``): the chosen
        picture, every round's, the judge's verdicts and scores (see ``pipeline_port.reasoned_edit_v12``)."""
        settings.validate()
        self._require_port_settings(settings, "a v1.2 edit")
        return reasoned_edit_v12(self, to_rgb(image), instruction, settings, chat, callback)

    @staticmethod
    def _require_port_settings(settings: EditSettings, flow: str) -> None:
        unsupported = settings.unsupported_by_the_port()
        if unsupported:
            raise ValueError(f"{', '.join(unsupported)}: not available for {flow}, whose reference loop has no such "
                             "option; leave them at their defaults")

