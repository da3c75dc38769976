"""The Qwen2.5-VL encoder under ComfyUI's memory management.

The Hugging Face model (from a Hugging Face folder, or from ComfyUI's single-file Qwen2.5-VL-7B) is
wrapped in a `ModelPatcher`: ComfyUI moves it to the GPU for encoding and offloads it when memory is
needed, like its own text encoders. fp8 weights stay fp8 there, so it counts their real size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths

from ..step1x_core.ops import COMPUTE_DTYPES
from ..step1x_core.qwen.embedder import QwenVLEmbedder
from ..step1x_core.qwen.prompt import EMPTY_INSTRUCTION_WARNING
from .inputs import inside_loop, usable_files

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
    """Qwen-VL hidden states [B, 640, C] and masks [B, 640] for the instruction and the negative."""

    cond: Tensor
    cond_mask: Tensor
    uncond: Tensor
    uncond_mask: Tensor


def qwen_folders() -> list[str]:
    """Hugging Face model folders (holding config.json) under models/text_encoders/, one or two deep."""
    found = set()
    for base in folder_paths.get_folder_paths(FOLDER):
        base = Path(base)
        if not base.is_dir():
            continue
        for config in [*base.glob("*/config.json"), *base.glob("*/*/config.json")]:
            name = config.parent.relative_to(base).as_posix()
            if config.is_file() and not inside_loop(base, f"{name}/config.json"):  # no dangling or looping links
                found.add(name)
    return sorted(found)


def qwen_choices() -> list[str]:
    """Hugging Face folders first, then the single .safetensors files (e.g. ComfyUI's qwen_2.5_vl_7b*)."""
    files = [name for name in usable_files(FOLDER) if name.lower().endswith(".safetensors")]
    return qwen_folders() + sorted(files)


def require_inside(name: str) -> None:
    """Refuse names that leave models/text_encoders/ (`../`, absolute paths): the loader reads only there."""
    normalised = os.path.normpath(name)
    if os.path.isabs(name) or normalised == os.pardir or normalised.startswith(os.pardir + os.sep):
        raise ValueError(f"model_folder {name!r} points outside models/{FOLDER}/; pick an entry from the list "
                         f"(a Qwen2.5-VL-7B-Instruct folder or file inside models/{FOLDER}/)")


def resolve_model(name: str) -> Path:
    """The folder or single file ``name`` under models/text_encoders/."""
    require_inside(name)
    for base in folder_paths.get_folder_paths(FOLDER):
        candidate = Path(base) / name
        if candidate.is_dir():
            return candidate
    path = folder_paths.get_full_path(FOLDER, name)
    if path is not None:
        return Path(path)
    raise FileNotFoundError(f"no folder or file {name!r} under models/{FOLDER}/ (looked in "
                            f"{folder_paths.get_folder_paths(FOLDER)})")


def model_files(path: Path) -> list[Path]:
    """The files whose change means the encoder must be reloaded."""
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def load_qwen_encoder(name: str, dtype: str = "auto", device: str = "default") -> QwenEncoder:
    load_device = torch.device("cpu") if device == "cpu" else mm.text_encoder_device()
    offload_device = torch.device("cpu") if device == "cpu" else mm.text_encoder_offload_device()
    torch_dtype = COMPUTE_DTYPES[dtype] or (torch.bfloat16 if mm.should_use_bf16(load_device) else torch.float32)
    embedder = QwenVLEmbedder.from_pretrained(resolve_model(name), dtype=torch_dtype, device=offload_device)
    patcher = comfy.model_patcher.ModelPatcher(ModelHolder(embedder.model), load_device=load_device,
                                               offload_device=offload_device)
    return QwenEncoder(embedder, patcher)


def encode(encoder: QwenEncoder, images: Tensor, instruction: str, negative: str) -> QwenEmbeddings:
    """images: ComfyUI IMAGE [B, H, W, 3] in [0, 1]; one embedding pair per image."""
    if not instruction.strip():
        logger.warning(EMPTY_INSTRUCTION_WARNING)
    # Full load: the Hugging Face layers are not comfy.ops layers, so they cannot stream weights.
    mm.load_models_gpu([encoder.patcher], force_full_load=True)
    # RGB only: a 4th (alpha) channel is dropped, as VAEEncode drops it, so both see the same pixels.
    pixels = [image[..., :3].permute(2, 0, 1).float().cpu() for image in images]
    with torch.inference_mode():
        cond = encoder.embedder([instruction] * len(pixels), pixels)
        uncond = encoder.embedder([negative] * len(pixels), pixels)
    out = mm.intermediate_device()
    return QwenEmbeddings(cond.embs.to(out), cond.masks.to(out), uncond.embs.to(out), uncond.masks.to(out))
