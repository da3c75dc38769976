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
           "stepfun-ai/Step1X-Edit, or the transformer/ folder of stepfun-ai/Step1X-Edit-v1p2 (download it again "
           "if it was cut short or converted by another tool)")
_BLOCKS = {"original": ("double_blocks", "single_blocks"),
           "diffusers": ("transformer_blocks", "single_transformer_blocks")}
_SCALE_FACTOR = "connector.scale_factor"
_MAPPING = "text_token_mapping."


def _meta_state_dict(params: DiTParams) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return Step1XEditDiT(params).state_dict()


def dit_expected(params: DiTParams, layout: str, file_version: Version) -> ExpectedTensors:
    """What a file of ``layout`` must hold for the model ``params`` describe. ``file_version`` is the version
    the file's keys show; a forced other version changes only whether ``connector.scale_factor`` (v1.0) and
    ``text_token_mapping.*`` (v1.2) are read."""
    sd = _meta_state_dict(params)
    if layout == "diffusers":
        sd = original_to_diffusers(sd, params.hidden_size)
    double, single = _BLOCKS[layout]
    notes = {}
    if params.version.has_connector_scale_factor and not file_version.has_connector_scale_factor:
        notes[_SCALE_FACTOR] = f"the file is a {file_version} DiT (v1.0 files have it); choose version auto"
    if params.version.has_text_token_mapping and not file_version.has_text_token_mapping:
        notes.update({name: f"the file is a {file_version} DiT (v1.2's have it); choose version auto"
                      for name in sd if name.startswith(_MAPPING)})
    in_name, out_name = ("x_embedder.weight", "proj_out.weight") if layout == "diffusers" else \
        ("img_in.weight", "final_layer.linear.weight")
    latent = "the FLUX VAE's latent: 16 channels in 2x2 patches"
    return ExpectedTensors(
        model="the Step1X-Edit DiT",
        shapes={name: tuple(t.shape) for name, t in sd.items()},
        fix=DIT_FIX,
        # v1.0's scale_factor and v1.2's text_token_mapping are simply not read under another forced version.
        ignored=lambda name: (name == _SCALE_FACTOR and not params.version.has_connector_scale_factor)
        or (name.startswith(_MAPPING) and not params.version.has_text_token_mapping),
        sizes=(NamedSize("in_channels", PATCH_CHANNELS, in_name, 1, latent),
               NamedSize("out_channels", PATCH_CHANNELS, out_name, 0, latent)),
        blocks=(BlockCount(double, params.depth, "double blocks"),
                BlockCount(single, params.depth_single_blocks, "single blocks"),
                BlockCount("connector.S.individual_token_refiner.blocks", params.connector.depth, "connector blocks")),
        notes=notes,
    )

