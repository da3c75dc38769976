"""The tensors a Step1X-Edit DiT file must hold, as an ``ExpectedTensors`` for the shared file check.

The sizes come from a few anchor tensors (``checkpoint.infer_params``); every other tensor is then checked
against the model those sizes describe, built on the meta device, in the file's own layout and names.
"""

from __future__ import annotations

import torch

from ..formats.expected import BlockCount, ExpectedTensors, NamedSize
from ..versions import Version
from .diffusers_keys import original_to_diffusers
from .model import Step1XEditDiT
from .params import DiTParams

__all__ = ["DIT_FIX", "PATCH_CHANNELS", "dit_expected"]

PATCH_CHANNELS = 64  # the FLUX VAE's 16 latent channels in 2x2 patches: the DiT's input and output width
DIT_FIX = ("Fix: use step1x-edit-v1p1-official.safetensors or step1x-edit-i1258.safetensors from "
           "stepfun-ai/Step1X-Edit (download it again if it was cut short or converted by another tool)")
_BLOCKS = {"original": ("double_blocks", "single_blocks"),
           "diffusers": ("transformer_blocks", "single_transformer_blocks")}
_SCALE_FACTOR = "connector.scale_factor"


def _meta_state_dict(params: DiTParams) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return Step1XEditDiT(params).state_dict()


def dit_expected(params: DiTParams, layout: str, file_version: Version) -> ExpectedTensors:
    """What a file of ``layout`` must hold for the model ``params`` describe. ``file_version`` is the version
    the file's keys show; a forced other version changes only whether ``connector.scale_factor`` is read."""
    sd = _meta_state_dict(params)
    if layout == "diffusers":
        sd = original_to_diffusers(sd, params.hidden_size)
    double, single = _BLOCKS[layout]
    notes = {}
    if params.version.has_connector_scale_factor and not file_version.has_connector_scale_factor:
        notes[_SCALE_FACTOR] = "the file is a v1.1 DiT (v1.0 files have it); choose version v1.1 or auto"
    in_name, out_name = ("x_embedder.weight", "proj_out.weight") if layout == "diffusers" else \
        ("img_in.weight", "final_layer.linear.weight")
    latent = "the FLUX VAE's latent: 16 channels in 2x2 patches"
    return ExpectedTensors(
        model="the Step1X-Edit DiT",
        shapes={name: tuple(t.shape) for name, t in sd.items()},
        fix=DIT_FIX,
        # v1.0's scale_factor is simply not read when version v1.1 is forced on a v1.0 file.
        ignored=lambda name: name == _SCALE_FACTOR and not params.version.has_connector_scale_factor,
        sizes=(NamedSize("in_channels", PATCH_CHANNELS, in_name, 1, latent),
               NamedSize("out_channels", PATCH_CHANNELS, out_name, 0, latent)),
        blocks=(BlockCount(double, params.depth, "double blocks"),
                BlockCount(single, params.depth_single_blocks, "single blocks"),
                BlockCount("connector.S.individual_token_refiner.blocks", params.connector.depth, "connector blocks")),
        notes=notes,
    )

