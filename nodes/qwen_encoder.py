"""The Qwen2.5-VL encoder under ComfyUI's memory management.

The Hugging Face model (from a Hugging Face folder, or from ComfyUI's single-file Qwen2.5-VL-7B) is
wrapped in a `ModelPatcher`: ComfyUI moves it to the GPU for encoding and offloads it when memory is
needed, like its own text encoders. fp8 weights stay fp8 there, so it counts their real size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import comfy.model_management as mm
import comfy.model_patcher

from ..step1x_core.ops import COMPUTE_DTYPES
from ..step1x_core.pipeline import text_to_image
from ..step1x_core.qwen.embedder import QwenVLEmbedder
from ..step1x_core.qwen.encoding import PromptEncoding
from ..step1x_core.qwen.prompt import EMPTY_INSTRUCTION_WARNING
from ..step1x_core.versions import Version
from .model_lists import model_choices, resolve

logger = logging.getLogger(__name__)

FOLDER = "text_encoders"


class ModelHolder(torch.nn.Module):
    """What the ModelPatcher manages: ComfyUI sets attributes such as `device` on its model, which a
    Hugging Face model exposes read-only."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model


@dataclass
class QwenEncoder:
    embedder: QwenVLEmbedder
    patcher: comfy.model_patcher.ModelPatcher


@dataclass
class QwenEmbeddings:
    """The instruction and the negative, encoded in one version's prompt format."""

    cond: PromptEncoding
    uncond: PromptEncoding
    prompt_format: Version  # V1_1 stands for v1.0/v1.1's format, V1_2 for v1.2's


def qwen_choices() -> list[str]:
    """Hugging Face folders first, then the single .safetensors files (e.g. ComfyUI's qwen_2.5_vl_7b*)."""
    return model_choices(FOLDER)


def resolve_model(name: str) -> Path:
    """The folder or single file ``name`` under models/text_encoders/."""
    return resolve(FOLDER, name, "model_folder")


def load_qwen_encoder(name: str, dtype: str = "auto", device: str = "default",
                      keep_lm_head: bool = False) -> QwenEncoder:
    load_device = torch.device("cpu") if device == "cpu" else mm.text_encoder_device()
    offload_device = torch.device("cpu") if device == "cpu" else mm.text_encoder_offload_device()
    torch_dtype = COMPUTE_DTYPES[dtype] or (torch.bfloat16 if mm.should_use_bf16(load_device) else torch.float32)
    embedder = QwenVLEmbedder.from_pretrained(resolve_model(name), dtype=torch_dtype, device=offload_device,
                                              keep_lm_head=keep_lm_head)
    patcher = patcher_class()(ModelHolder(embedder.model), load_device=load_device, offload_device=offload_device)
    return QwenEncoder(embedder, patcher)


def patcher_class() -> type:
    """The patcher ComfyUI gives its own text encoders: `CoreModelPatcher`, which ComfyUI 0.38 makes its dynamic
    VRAM patcher where dynamic VRAM is on (it loads these plain torch layers whole and offloads them whole, next
    to dynamic models rather than evicting them); the classic ModelPatcher in versions without it, and for a CPU
    load device (where the dynamic patcher hands over to the classic one itself)."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


PROMPT_FORMATS = {"v1.0 / v1.1": Version.V1_1, "v1.2": Version.V1_2}


def encode(encoder: QwenEncoder, images: Tensor | None, instruction: str, negative: str,
           prompt_format: Version = Version.V1_1) -> QwenEmbeddings:
    """images: ComfyUI IMAGE [B, H, W, 3] in [0, 1], one embedding pair per image; None for text-to-image
    (the engine's rules: the MLLM sees its black square, and an empty negative becomes the references' long
    default)."""
    if not instruction.strip():
        logger.warning(EMPTY_INSTRUCTION_WARNING)
    # Full load: the Hugging Face layers are not comfy.ops layers, so they cannot stream weights.
    mm.load_models_gpu([encoder.patcher], force_full_load=True)
    with torch.inference_mode():
        if images is None:
            cond, uncond = text_to_image.encode_prompts(encoder.embedder, instruction,
                                                        text_to_image.negative_prompt(negative), prompt_format)
        else:
            # RGB only: a 4th (alpha) channel is dropped, as VAEEncode drops it, so both see the same pixels.
            pixels = [image[..., :3].permute(2, 0, 1).float().cpu() for image in images]
            cond, uncond = (PromptEncoding.cat([encoder.embedder.encode(text, frame, prompt_format)
                                                for frame in pixels]) for text in (instruction, negative))
    out = mm.intermediate_device()
    return QwenEmbeddings(cond.to(out), uncond.to(out), prompt_format)
