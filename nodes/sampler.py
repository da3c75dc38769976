"""The Step1X-Edit sampler: reference-latent editing on ComfyUI's own sampling machinery.

It picks the official schedule (`scheduler.py`), attaches the reference latent to both conditionings,
puts normalised CFG first in the model's CFG chain (`guidance.py`) and runs ComfyUI's Euler sampler with
the reference as the latent image, so progress, previews, interrupt, model management, latent noise
masks (SetLatentNoiseMask, DifferentialDiffusion) and the model's CFG patches are all native.
"""

from __future__ import annotations

from comfy_api.latest import io
from torch import Tensor

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import node_helpers

from ..step1x_core.sampling.guidance import DEFAULT_NORM_CFG_THRESHOLD
from .guards import check_sampler_inputs, with_nan_stop
from .guidance import with_normalized_cfg
from .scheduler import sampler_sigmas
from .types import CATEGORY

EMPTY_MASK = ("the reference latent's noise mask is empty, so nothing would change: paint the area to edit in Load "
              "Image's mask editor (right-click the image, Open in MaskEditor), or remove Set Latent Noise Mask")


class Step1XEditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditSampler",
            display_name="Step1X-Edit Sampler",
            category=CATEGORY,
            description="Edits the reference latent: Euler sampling on the official shifted schedule with "
                        "the reference image's tokens appended, true CFG and Step1X-Edit's normalised CFG. "
                        "A noise mask on the reference latent (Set Latent Noise Mask) limits the edit to the mask.",
            inputs=[
                io.Model.Input("model", tooltip="The Step1X-Edit model (LoRA-patched models work too)."),
                io.Conditioning.Input("positive", tooltip="From Step1X-Edit Connector."),
                io.Conditioning.Input("negative", tooltip="From Step1X-Edit Connector."),
                io.Latent.Input("reference_latent",
                                tooltip="VAEEncode of the scaled input image (FLUX VAE); the result has its size. "
                                        "With a noise mask (Set Latent Noise Mask) only the masked area changes."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise."),
                io.Int.Input("steps", default=28, min=1, max=200, tooltip="Denoising steps; the official setting is 28."),
                io.Float.Input("cfg", default=6.0, min=1.0, max=30.0, step=0.1,
                               tooltip="Guidance scale (official: 6.0). 1.0 skips the negative branch."),
                io.Float.Input("norm_cfg_threshold", default=DEFAULT_NORM_CFG_THRESHOLD, min=0.0, max=1.0,
                               step=0.01, tooltip="Normalised CFG is applied while t > this. 0.93 as the later "
                                                  "official code; 1.0 turns it off (v1.0's effective behaviour). "
                                                  "A model patched by Step1X-Edit Normalized CFG keeps its own."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="1.0 starts from pure noise; lower values start from the noised input "
                                       "image and keep more of it."),
            ],
            outputs=[io.Latent.Output(tooltip="The edited latent; decode it with the FLUX VAE.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, reference_latent, seed, steps, cfg, norm_cfg_threshold,
                denoise) -> io.NodeOutput:
        return io.NodeOutput(edit_latent(model, positive, negative, reference_latent, seed, steps, cfg,
                                         norm_cfg_threshold, denoise))


def edit_latent(model, positive, negative, reference_latent: dict, seed: int, steps: int, cfg: float,
                norm_cfg_threshold: float, denoise: float, noise: Tensor | None = None) -> dict:
    """The Step1X-Edit Sampler's work: the edited LATENT dict for a reference LATENT dict. ``noise``: the
    starting noise when the caller draws it (Reflect draws it as the engine does), else ComfyUI's from seed."""
    reference = reference_latent["samples"]
    check_sampler_inputs(model, positive, negative, reference, cfg=cfg, norm_cfg_threshold=norm_cfg_threshold,
                         denoise=denoise)
    noise_mask = reference_latent.get("noise_mask")
    if noise_mask is not None and not bool(noise_mask.any()):
        raise ValueError(EMPTY_MASK)
    sigmas = sampler_sigmas(model, reference, steps, denoise)
    positive, negative = (node_helpers.conditioning_set_values(c, {"reference_latents": [reference]}, append=True)
                          for c in (positive, negative))
    guided = with_nan_stop(with_normalized_cfg(model, norm_cfg_threshold))
    if noise is None:
        noise = comfy.sample.prepare_noise(reference, seed, reference_latent.get("batch_index"))
    callback = latent_preview.prepare_callback(guided, len(sigmas) - 1)
    # The reference is the latent image: at t = 1 the start is pure noise all the same, and under a noise
    # mask the protected area follows the reference (ComfyUI's inpainting blend).
    samples = comfy.sample.sample_custom(
        guided, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, positive, negative, reference,
        noise_mask=noise_mask, callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = reference_latent.copy()
    out["samples"] = samples
    return out
