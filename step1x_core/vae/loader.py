"""Loading a FLUX.1 ``ae.safetensors``, and saying what a file is when it is not one."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..formats.expected import ExpectedTensors, check_tensors, checked_weight, module_shapes
from ..formats.identify import DIFFUSERS_VAE, FLUX_VAE, SD_VAE, identify
from ..formats.safetensors_file import ModelFileError, load_shards, load_tensors, read_header
from .diffusers_keys import diffusers_vae_to_bfl, is_diffusers_vae
from .model import AutoEncoder
from .params import (LATENT_CHANNELS, NORM_GROUPS, SCALE_FACTOR, SHIFT_FACTOR, AutoEncoderParams,
                     params_from_shapes)

logger = logging.getLogger(__name__)


class VAEFileError(ModelFileError):
    """A VAE file is missing, unreadable, or not the FLUX.1 ``ae.safetensors``."""


_NEEDED = f"Step1X-Edit needs the FLUX.1 ae.safetensors VAE ({LATENT_CHANNELS} latent channels)"


def load_vae(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    norm_groups: int | None = None,
) -> AutoEncoder:
    """Load FLUX.1's AE as an eval-mode ``AutoEncoder``: BFL's single ``ae.safetensors`` (any size of that
    layout), the same weights in diffusers' ``AutoencoderKL`` layout, or a diffusers ``vae/`` folder (whose
    config.json gives the GroupNorm group count, 32 otherwise; ``norm_groups`` overrides both).

    The model is built on the ``meta`` device and the memory-mapped tensors are assigned to it, so
    no random init runs and, when ``dtype`` matches the file, no second copy of the weights is made.
    Raises ``VAEFileError`` for a missing, non-safetensors, unreadable or non-FLUX-AE file.
    """
    path = Path(path)
    if not path.exists():
        raise VAEFileError(f"VAE file not found: {path}")
    if path.is_dir():
        tensors = load_shards(path, VAEFileError)
        norm_groups = norm_groups or _folder_norm_groups(path)
        shapes, dtypes = _table(tensors)
    else:
        # The header first: a wrong file is named before any weight is read.
        header = read_header(path, VAEFileError)
        shapes, dtypes, tensors = header.shapes, header.dtypes, None
    if is_diffusers_vae(shapes) and identify(shapes) is DIFFUSERS_VAE:
        tensors = diffusers_vae_to_bfl(tensors if tensors is not None else load_tensors(path, VAEFileError))
        shapes, dtypes = _table(tensors)
    params = _flux_params_or_error(path.name, shapes, norm_groups or NORM_GROUPS)
    model = AutoEncoder(params, dtype=dtype, device="meta")
    # Names, shapes and dtypes against the model, before any weight is read; NaN/Inf refused while casting.
    expected = ExpectedTensors(model="the FLUX.1 VAE (ae.safetensors)", shapes=module_shapes(model),
                               fix=f"Fix: {_NEEDED}; download it again if it was cut short")
    check_tensors(path.name, expected, shapes, dtypes, VAEFileError)
    if tensors is None:
        tensors = load_tensors(path, VAEFileError, device)
    state_dict = {key: checked_weight(t, key, path.name, dtype, device, error=VAEFileError)
                  for key, t in tensors.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.eval().requires_grad_(False)
    logger.info(
        "Loaded FLUX VAE %s: ch=%d ch_mult=%s num_res_blocks=%d z_channels=%d, %s on %s",
        path.name, params.ch, list(params.ch_mult), params.num_res_blocks, params.z_channels, dtype, device,
    )
    return model


def _table(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """Shapes and dtypes of tensors already read (a folder, or a converted diffusers layout)."""
    return {key: tuple(t.shape) for key, t in tensors.items()}, {key: t.dtype for key, t in tensors.items()}


def _folder_norm_groups(folder: Path) -> int:
    """The GroupNorm group count a diffusers vae/ folder's config.json states (FLUX's 32 without one)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return NORM_GROUPS
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        groups = int(config.get("norm_num_groups", NORM_GROUPS))
        factors = (float(config.get("scaling_factor", SCALE_FACTOR)), float(config.get("shift_factor", SHIFT_FACTOR)))
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise VAEFileError(f"{config_path}: not a readable AutoencoderKL config ({err}); download it again") from err
    if factors != (SCALE_FACTOR, SHIFT_FACTOR):
        raise VAEFileError(f"{folder.name}: its latent scale/shift {factors} are not FLUX's ({SCALE_FACTOR}, "
                           f"{SHIFT_FACTOR}); {_NEEDED}")
    return groups


def _flux_params_or_error(file_name: str, shapes: Mapping[str, tuple[int, ...]],
                          norm_groups: int = NORM_GROUPS) -> AutoEncoderParams:
    """Return the AE params, or raise a VAEFileError that says what the file holds instead."""
    if not shapes:
        raise VAEFileError(f"{file_name} holds no tensors; {_NEEDED}")
    kind = identify(shapes)
    if kind is SD_VAE:
        z_channels = shapes.get("decoder.conv_in.weight", (None, "?"))[1]
        raise VAEFileError(f"{file_name} is an SD1.x/SDXL-style VAE ({z_channels} latent channels, quant_conv "
                           f"layers); {_NEEDED}")
    if kind is not FLUX_VAE or "encoder.conv_in.weight" not in shapes:
        found = kind.description if kind else f"{len(shapes)} tensors such as {sorted(shapes)[:3]}"
        raise VAEFileError(f"{file_name} is not a VAE (no 'encoder.conv_in.weight'): found {found}; {_NEEDED}")
    try:
        params = params_from_shapes(shapes, norm_groups)
    except ValueError as err:
        raise VAEFileError(f"{file_name} does not have the FLUX AE layout: {err}; {_NEEDED}") from err
    if params.z_channels != LATENT_CHANNELS:
        raise VAEFileError(f"{file_name} is a VAE with {params.z_channels} latent channels; {_NEEDED}")
    return params
