"""Step1X-Edit in ComfyUI's model detection, so native Load Diffusion Model (and any loader that goes through
`comfy.sd.load_diffusion_model_state_dict`, ComfyUI-GGUF's too) builds a Step1X-Edit file as Step1X-Edit.

Two touch points, each held against the newest ComfyUI's callers by a contract test:
- `comfy.supported_models.models`: detection asks each config in order whether it ``matches`` the file and
  takes the first that does. ComfyUI's own detection reads a Step1X-Edit DiT as a FLUX DiT, so ours goes
  first; it accepts only files that carry Step1X-Edit's connector and leaves every other file to the configs
  after it.
- `comfy.model_detection.convert_diffusers_mmdit`: a file in the diffusers layout reaches detection only after
  this conversion, which keeps FLUX's tensors and drops the connector. ComfyUI has no hook for a family's own
  conversion, so for Step1X-Edit files (and only those) ours runs instead; every other call, with whatever
  arguments ComfyUI passes, goes to ComfyUI's own.
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
    def convert_diffusers_mmdit(state_dict, output_prefix="", *args, **kwargs):
        if not output_prefix and is_diffusers_layout(state_dict) and identify(state_dict) is STEP1X_DIT:
            return diffusers_to_original(state_dict)
        return convert(state_dict, output_prefix, *args, **kwargs)

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
