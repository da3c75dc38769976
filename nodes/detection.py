"""Step1X-Edit in ComfyUI's model detection, so native Load Diffusion Model loads a Step1X-Edit file as
Step1X-Edit.

ComfyUI's `detect_unet_config` reads a Step1X-Edit DiT as a FLUX DiT (same blocks, no guidance) and would
build a FLUX without the connector. Detection walks `comfy.supported_models.models` in order and takes
the first config whose `matches` accepts the file, so ours goes first: it accepts only files that carry
Step1X-Edit's connector and leaves every other file to the configs after it. A file in the diffusers
layout never reaches detection as it is: ComfyUI first converts it with `convert_diffusers_mmdit`, which
keeps FLUX's tensors only; for Step1X-Edit files that conversion becomes ours, which keeps the connector.
"""

from __future__ import annotations

import functools

import comfy.model_detection
import comfy.supported_models

from ..step1x_core.dit.diffusers_keys import diffusers_to_original, is_diffusers_layout
from ..step1x_core.formats.identify import STEP1X_DIT, identify
from .comfy_model import Step1XEditConfig


def _keeping_the_connector(convert):
    @functools.wraps(convert)
    def convert_diffusers_mmdit(state_dict, output_prefix=""):
        if not output_prefix and is_diffusers_layout(state_dict) and identify(state_dict) is STEP1X_DIT:
            return diffusers_to_original(state_dict)
        return convert(state_dict, output_prefix)

    convert_diffusers_mmdit.step1x_edit = True
    return convert_diffusers_mmdit


def register_model_detection() -> None:
    """Put Step1X-Edit first in ComfyUI's model detection (once)."""
    models = comfy.supported_models.models
    if Step1XEditConfig not in models:
        models.insert(0, Step1XEditConfig)
    convert = comfy.model_detection.convert_diffusers_mmdit
    if not getattr(convert, "step1x_edit", False):
        comfy.model_detection.convert_diffusers_mmdit = _keeping_the_connector(convert)
