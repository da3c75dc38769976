"""Step1XEditPipeline: image + instruction -> edited image, standalone (no ComfyUI).

Loads the three parts, checks what is asked, and hands the work to the flow of the DiT's version:
``official_edit`` (v1.0/v1.1), ``v12_edit`` (v1.2), ``reasoned`` (v1.2 thinking and reflection) and
``text_to_image`` (v1.1/v1.2).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ..dit.attention import attention_backend
from ..dit.checkpoint import LoadedCheckpoint
from ..dit.loading import load_dit, read_dit_checkpoint
from ..dit.model import Step1XEditDiT
from ..images.reading import to_rgb
from ..ops import fp8_matmul_available
from ..qwen.embedder import QwenVLEmbedder
from ..qwen.prompt import EMPTY_INSTRUCTION_WARNING
from ..sampling.diffusers import cpu_generator
from ..sampling.loop import DiTText, StepCallback
from ..vae.loader import load_vae
from . import official_edit
from .fit import check_encoder_width, encoder_width
from .models import Models
from .reasoned import ReasonedEdit, reasoned_edit_v12
from .settings import EditSettings, default_device, default_dtype
from .text_to_image import text_to_image
from .v12_edit import edit_v12

logger = logging.getLogger(__name__)


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


class Step1XEditPipeline(Models):
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

    # The official flow's stages, for callers that run them one by one.
    def encode_prompt(self, instruction: str, image: Tensor, negative: str = "",
                      with_uncond: bool = True) -> tuple[DiTText, DiTText | None]:
        return official_edit.encode_prompt(self, instruction, image, negative, with_uncond)

    def sample(self, prompts: tuple[DiTText, DiTText | None], reference: Tensor, settings: EditSettings,
               callback: StepCallback | None = None) -> Tensor:
        return official_edit.sample(self, *prompts, reference, settings, callback)

    def __call__(self, image: Image.Image, instruction: str, settings: EditSettings | None = None,
                 callback: StepCallback | None = None) -> Image.Image:
        """Edit ``image`` as ``instruction`` says (the flow of the DiT's version)."""
        settings = settings or EditSettings()
        settings.validate()
        if not instruction.strip():
            logger.warning(EMPTY_INSTRUCTION_WARNING)
        image = to_rgb(image)
        if settings.reasoning:
            return self.reason(image, instruction, settings, callback=callback).image
        if self.dit.params.version.reasoning_prompts:
            return edit_v12(self, image, instruction, settings, cpu_generator(settings.seed), callback).image
        return official_edit.edit(self, image, instruction, settings, callback)

    def generate(self, prompt: str, width: int = 1024, height: int = 1024, settings: EditSettings | None = None,
                 callback: StepCallback | None = None) -> Image.Image:
        """Text-to-image with a v1.1 or v1.2 DiT: a ``width`` x ``height`` picture of ``prompt`` (sides are
        worked at multiples of 16 and the result resized to the size asked). ``settings.negative`` empty
        means the reference's long default negative prompt."""
        settings = settings or EditSettings()
        settings.validate()
        return text_to_image(self, prompt, width, height, settings, cpu_generator(settings.seed), callback).image

    def reason(self, image: Image.Image, instruction: str, settings: EditSettings, chat=None,
               callback: StepCallback | None = None) -> ReasonedEdit:
        """A v1.2 edit with thinking and/or reflection (``settings.think``, ``settings.reflect``): the chosen
        picture, every round's, the judge's verdicts and scores (see ``reasoned.reasoned_edit_v12``)."""
        settings.validate()
        return reasoned_edit_v12(self, to_rgb(image), instruction, settings, chat, callback)
