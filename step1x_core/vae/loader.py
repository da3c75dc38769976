"""Loading a FLUX.1 ``ae.safetensors``, and saying what a file is when it is not one."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..formats.expected import ExpectedTensors, check_tensors, checked_weight, module_shapes
from ..formats.identify import DIFFUSERS_VAE, FLUX_VAE, SD_VAE, identify
from ..formats.safetensors_file import ModelFileError, load_tensors, read_header
from .model import AutoEncoder
from .params import LATENT_CHANNELS, AutoEncoderParams, params_from_shapes

logger = logging.getLogger(__name__)


class VAEFileError(ModelFileError):
    """A VAE file is missing, unreadable, or not the FLUX.1 ``ae.safetensors``."""


_NEEDED = f"Step1X-Edit needs the FLUX.1 ae.safetensors VAE ({LATENT_CHANNELS} latent channels)"


def load_vae(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoEncoder:
    """Load a FLUX.1 ``ae.safetensors`` (any size of the same layout) as an eval-mode ``AutoEncoder``.

    The model is built on the ``meta`` device and the memory-mapped tensors are assigned to it, so
    no random init runs and, when ``dtype`` matches the file, no second copy of the weights is made.
    Raises ``VAEFileError`` for a missing, non-safetensors, unreadable or non-FLUX-AE file.
    """
    path = Path(path)
    if not path.exists():
        raise VAEFileError(f"VAE file not found: {path}")
    # The header first: a wrong file is named before any weight is read.
    header = read_header(path, VAEFileError)
    params = _flux_params_or_error(path.name, header.shapes)
    model = AutoEncoder(params, dtype=dtype, device="meta")
    # Names, shapes and dtypes against the model, before any weight is read; NaN/Inf refused while casting.
    expected = ExpectedTensors(model="the FLUX.1 VAE (ae.safetensors)", shapes=module_shapes(model),
                               fix=f"Fix: {_NEEDED}; download it again if it was cut short")
    check_tensors(path.name, expected, header.shapes, header.dtypes, VAEFileError)
    state_dict = {key: checked_weight(t, key, path.name, dtype, error=VAEFileError)
                  for key, t in load_tensors(path, VAEFileError, device).items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.eval().requires_grad_(False)
    logger.info(
        "Loaded FLUX VAE %s: ch=%d ch_mult=%s num_res_blocks=%d z_channels=%d, %s on %s",
        path.name, params.ch, list(params.ch_mult), params.num_res_blocks, params.z_channels, dtype, device,
    )
    return model


def _flux_params_or_error(file_name: str, shapes: Mapping[str, tuple[int, ...]]) -> AutoEncoderParams:
    """Return the AE params, or raise a VAEFileError that says what the file holds instead."""
    if not shapes:
        raise VAEFileError(f"{file_name} holds no tensors; {_NEEDED}")
    kind = identify(shapes)
    if kind is DIFFUSERS_VAE:
        raise VAEFileError(f"{file_name}: diffusers AutoencoderKL layout found ('encoder.down_blocks.*'); "
                           "use the single-file FLUX.1 ae.safetensors instead")
    if kind is SD_VAE:
        z_channels = shapes.get("decoder.conv_in.weight", (None, "?"))[1]
        raise VAEFileError(f"{file_name} is an SD1.x/SDXL-style VAE ({z_channels} latent channels, quant_conv "
                           f"layers); {_NEEDED}")
    if kind is not FLUX_VAE or "encoder.conv_in.weight" not in shapes:
        found = kind.description if kind else f"{len(shapes)} tensors such as {sorted(shapes)[:3]}"
        raise VAEFileError(f"{file_name} is not a VAE (no 'encoder.conv_in.weight'): found {found}; {_NEEDED}")
    try:
        params = params_from_shapes(shapes)
    except ValueError as err:
        raise VAEFileError(f"{file_name} does not have the FLUX AE layout: {err}; {_NEEDED}") from err
    if params.z_channels != LATENT_CHANNELS:
        raise VAEFileError(f"{file_name} is a VAE with {params.z_channels} latent channels; {_NEEDED}")
    return params
