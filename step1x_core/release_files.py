"""The released model files, where ComfyUI keeps them, and how to find them in a models folder."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .versions import Version

logger = logging.getLogger(__name__)


_OFFICIAL = (Version.V1_0, Version.V1_1)


@dataclass(frozen=True)
class ModelFile:
    role: str  # "dit", "text_encoder" or "vae"
    folder: str  # sub-folder of ComfyUI's models/
    name: str  # release file (or folder) name
    repo: str  # Hugging Face repository it comes from
    size: str
    note: str
    versions: tuple[Version, ...] = _OFFICIAL + (Version.V1_2,)  # the DiT versions it serves (a DiT: its own)
    # A diffusers release's folder (transformer/, text_encoder/): `name` is <release>/<repo_folder>, laid out
    # as published.
    repo_folder: str | None = None


RELEASE_FILES = (
    ModelFile("dit", "diffusion_models", "step1x-edit-v1p1-official.safetensors", "stepfun-ai/Step1X-Edit",
              "24.9 GB", "Step1X-Edit v1.1 DiT + connector (bf16), recommended", versions=(Version.V1_1,)),
    ModelFile("dit", "diffusion_models", "step1x-edit-i1258.safetensors", "stepfun-ai/Step1X-Edit",
              "24.9 GB", "Step1X-Edit v1.0 DiT + connector (bf16)", versions=(Version.V1_0,)),
    ModelFile("dit", "diffusion_models", "step1x-edit-i1258-FP8.safetensors", "meimeilook/Step1X-Edit-FP8",
              "12.4 GB", "community fp8 (float8_e4m3fn) copy of v1.0", versions=(Version.V1_0,)),
    ModelFile("dit", "diffusion_models", "Step1X-Edit-v1p2/transformer", "stepfun-ai/Step1X-Edit-v1p2", "24.9 GB",
              "Step1X-Edit v1.2 (ReasonEdit) DiT: the release's transformer/ folder (config.json + shards)",
              versions=(Version.V1_2,), repo_folder="transformer"),
    ModelFile("text_encoder", "text_encoders", "Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct",
              "16.6 GB", "the whole Hugging Face folder (config, tokenizer, processor, weights)", versions=_OFFICIAL),
    ModelFile("text_encoder", "text_encoders", "qwen_2.5_vl_7b.safetensors", "Comfy-Org/Qwen-Image_ComfyUI",
              "16.6 GB", "ComfyUI's single-file Qwen2.5-VL-7B (bf16), the one Qwen-Image uses (split_files/)",
              versions=_OFFICIAL),
    ModelFile("text_encoder", "text_encoders", "qwen_2.5_vl_7b_fp8_scaled.safetensors",
              "Comfy-Org/Qwen-Image_ComfyUI", "9.4 GB",
              "ComfyUI's fp8-scaled single file, the one Qwen-Image uses: about half the memory", versions=_OFFICIAL),
    ModelFile("text_encoder", "text_encoders", "Step1X-Edit-v1p2/text_encoder", "stepfun-ai/Step1X-Edit-v1p2",
              "16.6 GB", "v1.2's fine-tuned Qwen2.5-VL-7B (v1.2 needs it): the release's text_encoder/ folder",
              versions=(Version.V1_2,), repo_folder="text_encoder"),
    ModelFile("vae", "vae", "ae.safetensors", "black-forest-labs/FLUX.1-dev",
              "335 MB", "the FLUX.1 VAE; identical to Step1X-Edit's vae.safetensors"),
    ModelFile("vae", "vae", "vae.safetensors", "stepfun-ai/Step1X-Edit",
              "335 MB", "Step1X-Edit's copy of the FLUX.1 VAE (same weights as ae.safetensors)"),
    ModelFile("lora", "loras", "step1x-edit-lora256-alpha128-fix-hand.safetensors", "stepfun-ai/Step1X-Edit",
              "", "the official anime hand-fix LoRA (kohya format, rank 256, alpha 128; in the repo's lora/)"),
)

# The official DiT of each version (the name the download command fetches and the loaders suggest).
DIT_RELEASE = {Version.V1_1: "step1x-edit-v1p1-official.safetensors", Version.V1_0: "step1x-edit-i1258.safetensors",
               Version.V1_2: "Step1X-Edit-v1p2/transformer"}


def describe_missing(path: str | Path) -> str:
    """Why ``path`` cannot be opened: 'not found', or a symbolic link that leads nowhere."""
    path = Path(path)
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python < 3.13 reports a loop this way
            return "is a symbolic link in a loop (it leads back to itself); fix or remove the link"
        except OSError as err:
            what = "in a loop (it leads back to itself)" if "loop" in str(err).lower() else \
                f"to {os.readlink(path)}, which does not exist"
            return f"is a symbolic link {what}; fix or remove the link"
    return "not found"


def find_in_models_dir(models_dir: str | Path, role: str, version: Version | str | None = None) -> Path:
    """The release file of ``role`` under models_dir (ComfyUI layout), in the order of ``RELEASE_FILES``: the
    recommended one first. With a ``version``, only files that serve it (its DiT; v1.2 needs its own
    text encoder).

    The first file present is the one used, even when it is broken (a link to nowhere, a truncated download):
    it is named in an error rather than silently replaced by another model. Taking a later file (the v1.0 DiT
    when the v1.1 one is absent) is logged as a warning.
    """
    models_dir = Path(models_dir)
    version = Version.parse(version) if version is not None else None
    files = [f for f in RELEASE_FILES if f.role == role and (version is None or version in f.versions)]
    candidates = [models_dir / f.folder / f.name for f in files]
    present = [(f, path) for f, path in zip(files, candidates) if os.path.lexists(path)]  # broken links count
    if not present:
        names = ", ".join(str(p.relative_to(models_dir)) for p in candidates)
        which = f"{version} " if version else ""
        get = "step1x-edit-download" + (f" --version {version}" if version else "")
        raise FileNotFoundError(f"no {which}{role} model under {models_dir}: looked for {names}; download it "
                                f"({get}) or pass the file explicitly")
    chosen, path = present[0]
    if not path.exists():
        raise FileNotFoundError(f"{path} {describe_missing(path)}, or pass the file to use explicitly")
    if path != candidates[0] and role == "dit":
        logger.warning("%s is not in %s; using %s (%s). Pass --dit or --version to choose explicitly",
                       files[0].name, path.parent, chosen.name, chosen.note)
    else:
        logger.info("%s: %s", role.replace("_", " "), path)
    return path
