"""The released model files, where ComfyUI keeps them, and how to find them in a models folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .versions import Version


@dataclass(frozen=True)
class ModelFile:
    role: str  # "dit", "text_encoder" or "vae"
    folder: str  # sub-folder of ComfyUI's models/
    name: str  # release file (or folder) name
    repo: str  # Hugging Face repository it comes from
    size: str
    note: str


RELEASE_FILES = (
    ModelFile("dit", "diffusion_models", "step1x-edit-v1p1-official.safetensors", "stepfun-ai/Step1X-Edit",
              "24.9 GB", "Step1X-Edit v1.1 DiT + connector (bf16), recommended"),
    ModelFile("dit", "diffusion_models", "step1x-edit-i1258.safetensors", "stepfun-ai/Step1X-Edit",
              "24.9 GB", "Step1X-Edit v1.0 DiT + connector (bf16)"),
    ModelFile("dit", "diffusion_models", "step1x-edit-i1258-FP8.safetensors", "meimeilook/Step1X-Edit-FP8",
              "12.4 GB", "community fp8 (float8_e4m3fn) copy of v1.0"),
    ModelFile("text_encoder", "text_encoders", "Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct",
              "16.6 GB", "the whole Hugging Face folder (config, tokenizer, processor, weights)"),
    ModelFile("text_encoder", "text_encoders", "qwen_2.5_vl_7b.safetensors", "Comfy-Org/Qwen-Image_ComfyUI",
              "16.6 GB", "ComfyUI's single-file Qwen2.5-VL-7B (bf16), the one Qwen-Image uses (split_files/)"),
    ModelFile("text_encoder", "text_encoders", "qwen_2.5_vl_7b_fp8_scaled.safetensors",
              "Comfy-Org/Qwen-Image_ComfyUI", "9.4 GB",
              "ComfyUI's fp8-scaled single file, the one Qwen-Image uses: about half the memory"),
    ModelFile("vae", "vae", "ae.safetensors", "black-forest-labs/FLUX.1-dev",
              "335 MB", "the FLUX.1 VAE; identical to Step1X-Edit's vae.safetensors"),
    ModelFile("vae", "vae", "vae.safetensors", "stepfun-ai/Step1X-Edit",
              "335 MB", "Step1X-Edit's copy of the FLUX.1 VAE (same weights as ae.safetensors)"),
    ModelFile("lora", "loras", "step1x-edit-lora256-alpha128-fix-hand.safetensors", "stepfun-ai/Step1X-Edit",
              "", "the official anime hand-fix LoRA (kohya format, rank 256, alpha 128; in the repo's lora/)"),
)

# The official DiT of each version (the name the download command fetches and the loaders suggest).
DIT_RELEASE = {Version.V1_1: "step1x-edit-v1p1-official.safetensors", Version.V1_0: "step1x-edit-i1258.safetensors"}


def find_in_models_dir(models_dir: str | Path, role: str) -> Path:
    """The first release file of `role` present under models_dir (ComfyUI layout)."""
    models_dir = Path(models_dir)
    candidates = [models_dir / f.folder / f.name for f in RELEASE_FILES if f.role == role]
    for path in candidates:
        if path.exists():
            return path
    names = ", ".join(str(p.relative_to(models_dir)) for p in candidates)
    raise FileNotFoundError(f"no {role} model under {models_dir}: looked for {names}")
