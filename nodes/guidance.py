"""Step1X-Edit's normalised CFG as a ComfyUI pre-CFG function, and the model patch node that adds it.

Normalised CFG divides the guidance difference of each token (a 2x2 latent patch) by ||v_cond - v_uncond||^0.4
where that norm exceeds 1, while t > threshold. As a pre-CFG function it rewrites the conditional prediction
so that plain CFG gives exactly that, which leaves ComfyUI's CFG chain intact: a model CFG function
(RescaleCFG, PerpNeg, RenormCFG...) and post-CFG functions (CFGNorm, CFGZeroStar, SkipLayerGuidanceDiT...)
then act on the normalised predictions.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from comfy_api.latest import io

import comfy.ldm.common_dit

from ..step1x_core.sampling.guidance import DEFAULT_NORM_CFG_THRESHOLD, norm_cfg_divisor
from ..step1x_core.sampling.latents import pack, unpack
from .types import CATEGORY

logger = logging.getLogger(__name__)

THRESHOLD_ATTRIBUTE = "step1x_norm_cfg_threshold"  # marks our function in a model's pre-CFG chain


def normalized_cfg(threshold: float) -> Callable[[dict], list]:
    """A ``sampler_pre_cfg_function``: Step1X-Edit's normalised CFG while sigma (= t) > threshold."""
    def pre_cfg(args: dict) -> list:
        out = args["conds_out"]
        if args["conds"][1] is None:  # cfg 1: ComfyUI skipped the negative branch (its output is zeros)
            return out
        cond, uncond = out[0], out[1]
        sigma = args["sigma"].view(-1, 1, 1, 1)
        active = sigma > threshold
        if not bool(active.any()):
            return out
        diff = cond - uncond  # denoised difference = -sigma * velocity difference
        height, width = diff.shape[-2:]
        velocity = comfy.ldm.common_dit.pad_to_patch_size(diff / sigma, (2, 2))
        tokens = pack(velocity)
        divisor = unpack(norm_cfg_divisor(tokens).expand_as(tokens), *velocity.shape[-2:])
        divisor = torch.where(active, divisor[..., :height, :width], torch.ones_like(diff))
        return [uncond + diff / divisor, uncond, *out[2:]]

    setattr(pre_cfg, THRESHOLD_ATTRIBUTE, threshold)
    return pre_cfg


def normalized_cfg_threshold(model) -> float | None:
    """The threshold of the normalised CFG already in the model's pre-CFG chain, if any."""
    for function in model.model_options.get("sampler_pre_cfg_function", []):
        if hasattr(function, THRESHOLD_ATTRIBUTE):
            return getattr(function, THRESHOLD_ATTRIBUTE)
    return None


def with_normalized_cfg(model, threshold: float):
    """A clone of ``model`` whose pre-CFG chain starts with normalised CFG (so it reads the model's own
    predictions, before APG, TCFG and the like); a model that already has it is returned as it is."""
    existing = normalized_cfg_threshold(model)
    if existing is not None:
        if existing != threshold:
            logger.info("Step1X-Edit: the model already has normalised CFG (threshold %s), which is kept; the "
                        "threshold %s given here is not used", existing, threshold)
        return model
    patched = model.clone()
    chain = patched.model_options.get("sampler_pre_cfg_function", [])
    patched.model_options["sampler_pre_cfg_function"] = [normalized_cfg(threshold), *chain]
    return patched


class Step1XEditNormalizedCFG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditNormalizedCFG",
            display_name="Step1X-Edit Normalized CFG",
            category=CATEGORY,
            description="Adds Step1X-Edit's normalised CFG to the model, for native samplers (KSampler, "
                        "SamplerCustomAdvanced). The Step1X-Edit Sampler adds it by itself.",
            inputs=[
                io.Model.Input("model", tooltip="The Step1X-Edit model."),
                io.Float.Input("threshold", default=DEFAULT_NORM_CFG_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="Normalised CFG is applied while t (sigma) > this. 0.93 as the later official "
                                       "code; 1.0 turns it off (v1.0's effective behaviour)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with normalised CFG first in its CFG chain.")],
        )

    @classmethod
    def execute(cls, model, threshold) -> io.NodeOutput:
        return io.NodeOutput(with_normalized_cfg(model, threshold))
