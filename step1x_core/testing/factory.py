"""`make-tiny`: a ComfyUI-style models/ folder of tiny random models under the real release names.

    python -m step1x_core.testing make-tiny DIR

writes DIR/diffusion_models/ (a v1.0 and a v1.1 DiT, and v1.2's Step1X-Edit-v1p2/transformer/ folder),
DIR/text_encoders/Qwen2.5-VL-7B-Instruct/ (and the same Qwen as ComfyUI's single file
qwen_2.5_vl_7b_fp8_scaled.safetensors, and v1.2's fine-tuned Step1X-Edit-v1p2/text_encoder/),
DIR/vae/ae.safetensors and DIR/loras/ (a kohya-format LoRA under the official LoRA's name). The DiTs and Qwen are tiny; the VAE keeps the real FLUX architecture
(random weights) because ComfyUI builds FLUX VAEs with fixed widths.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..release_files import DIT_RELEASE, RELEASE_FILES
from ..vae.params import FLUX_AE_PARAMS
from ..versions import Version
from .tiny_dit import tiny_dit_params, write_tiny_dit
from .tiny_lora import write_tiny_lora
from .tiny_qwen import write_tiny_qwen, write_tiny_qwen_file
from .tiny_v12 import write_tiny_v12_text_encoder, write_tiny_v12_transformer
from .tiny_vae import tiny_vae_state_dict

TINY_QWEN_HIDDEN = 64
V12_TEXT_ENCODER = "Step1X-Edit-v1p2/text_encoder"
TEXT_GAIN = 100.0  # so the instruction matters as much as in a trained model (see tiny_dit_state_dict)
FACTORY_VERSION = "5"  # bump when the tiny models change, so cached copies are rebuilt


def _release_path(models_dir: Path, name: str) -> Path:
    entry = next(f for f in RELEASE_FILES if f.name == name)
    return models_dir / entry.folder / entry.name


def make_tiny(models_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny models into models_dir (created if needed) and return it."""
    models_dir = Path(models_dir)
    for offset, version in enumerate((Version.V1_0, Version.V1_1)):
        write_tiny_dit(_release_path(models_dir, DIT_RELEASE[version]), version, seed=seed + offset,
                       text_hidden=TINY_QWEN_HIDDEN, text_gain=TEXT_GAIN)
    write_tiny_qwen(_release_path(models_dir, "Qwen2.5-VL-7B-Instruct"), seed=seed)
    # The same tiny Qwen as ComfyUI ships the real one: one fp8-scaled file.
    write_tiny_qwen_file(_release_path(models_dir, "qwen_2.5_vl_7b_fp8_scaled.safetensors"), seed=seed,
                         fp8_scaled=True)
    vae_path = _release_path(models_dir, "ae.safetensors")
    vae_path.parent.mkdir(parents=True, exist_ok=True)
    vae_sd = {k: v.to(torch.bfloat16) for k, v in tiny_vae_state_dict(seed, FLUX_AE_PARAMS).items()}
    save_file(vae_sd, str(vae_path), metadata={"format": "pt", "tiny": "true"})
    write_tiny_lora(_release_path(models_dir, "step1x-edit-lora256-alpha128-fix-hand.safetensors"),
                    tiny_dit_params("v1.0", TINY_QWEN_HIDDEN), seed=seed)
    # v1.2 as its release is published: the transformer/ and text_encoder/ folders, placed as the downloader does.
    write_tiny_v12_transformer(_release_path(models_dir, DIT_RELEASE[Version.V1_2]), seed=seed + 2,
                               text_hidden=TINY_QWEN_HIDDEN, text_gain=TEXT_GAIN)
    write_tiny_v12_text_encoder(_release_path(models_dir, V12_TEXT_ENCODER), seed=seed + 7)
    (models_dir / ".step1x-tiny").write_text(FACTORY_VERSION)
    return models_dir


def tiny_models_dir() -> Path:
    """A cached tiny models folder for `step1x-edit --tiny` ($STEP1X_TINY_DIR or the user cache)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "step1x-edit" / "tiny-models"
    models_dir = Path(os.environ.get("STEP1X_TINY_DIR", default))
    marker = models_dir / ".step1x-tiny"
    if not marker.exists() or marker.read_text() != FACTORY_VERSION:
        make_tiny(models_dir)
    return models_dir
