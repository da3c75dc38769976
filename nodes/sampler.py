"""The Step1X-Edit sampler: reference-latent editing on ComfyUI's own sampling machinery.

It picks the official schedule (shifted by the target's token count), attaches the reference
latent to both conditionings, installs normalised CFG as a sampler CFG function, and runs
ComfyUI's Euler sampler, so progress, previews, interrupt and model management are native.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.ldm.common_dit
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import node_helpers

from ..step1x_core import sampling
from .guards import check_sampler_inputs
from .types import CATEGORY


def step1x_sigmas(latent: torch.Tensor, steps: int, denoise: float) -> torch.Tensor:
    """The official shifted schedule for this latent size; denoise < 1 keeps its last part."""
    tokens = ((latent.shape[-2] + 1) // 2) * ((latent.shape[-1] + 1) // 2)
    schedule = sampling.get_schedule(steps, tokens)
    if denoise < 1.0:
        schedule = schedule[sampling.img2img_start(schedule, denoise):]
    return torch.tensor(schedule, dtype=torch.float32)


def normalized_cfg(threshold: float):
    """ComfyUI sampler CFG function: Step1X-Edit's per-token normalised CFG while sigma > threshold.

    ComfyUI hands over cond/uncond as x - denoised = sigma * velocity; the norm is taken on the
    velocity difference over each 2x2 latent patch (the model's 64-channel tokens).
    """
    def combine(args: dict) -> torch.Tensor:
        cond, uncond, scale, sigma = args["cond"], args["uncond"], args["cond_scale"], args["sigma"]
        if args.get("input_uncond") is None:  # cfg 1: ComfyUI skipped the negative branch
            return cond
        diff = cond - uncond
        active = sigma > threshold
        if not bool(active.any()):
            return uncond + scale * diff
        height, width = diff.shape[-2:]
        velocity = comfy.ldm.common_dit.pad_to_patch_size(diff / sigma.view(-1, 1, 1, 1), (2, 2))
        tokens = sampling.pack(velocity)
        divisor = sampling.norm_cfg_divisor(tokens).expand_as(tokens)
        divisor = sampling.unpack(divisor, *velocity.shape[-2:])[..., :height, :width]
        divisor = torch.where(active.view(-1, 1, 1, 1), divisor, torch.ones_like(divisor))
        return uncond + scale * (diff / divisor)
    return combine


class Step1XEditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditSampler",
            display_name="Step1X-Edit Sampler",
            category=CATEGORY,
            description="Edits the reference latent: Euler sampling on the official shifted schedule with "
                        "the reference image's tokens appended, true CFG and Step1X-Edit's normalised CFG.",
            inputs=[
                io.Model.Input("model", tooltip="The Step1X-Edit model (LoRA-patched models work too)."),
                io.Conditioning.Input("positive", tooltip="From Step1X-Edit Connector."),
                io.Conditioning.Input("negative", tooltip="From Step1X-Edit Connector."),
                io.Latent.Input("reference_latent",
                                tooltip="VAEEncode of the scaled input image (FLUX VAE); the result has its size."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise."),
                io.Int.Input("steps", default=28, min=1, max=200, tooltip="Denoising steps; the official setting is 28."),
                io.Float.Input("cfg", default=6.0, min=1.0, max=30.0, step=0.1,
                               tooltip="Guidance scale (official: 6.0). 1.0 skips the negative branch."),
                io.Float.Input("norm_cfg_threshold", default=sampling.DEFAULT_NORM_CFG_THRESHOLD, min=0.0, max=1.0,
                               step=0.01, tooltip="Normalised CFG is applied while t > this. 0.93 as the later "
                                                  "official code; 1.0 turns it off (v1.0's effective behaviour)."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="1.0 starts from pure noise; lower values start from the noised input "
                                       "image and keep more of it."),
            ],
            outputs=[io.Latent.Output(tooltip="The edited latent; decode it with the FLUX VAE.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, reference_latent, seed, steps, cfg, norm_cfg_threshold,
                denoise) -> io.NodeOutput:
        reference = reference_latent["samples"]
        check_sampler_inputs(model, positive, negative, reference, cfg=cfg, norm_cfg_threshold=norm_cfg_threshold,
                             denoise=denoise)
        sigmas = step1x_sigmas(reference, steps, denoise)
        latent_image = reference if denoise < 1.0 else torch.zeros_like(reference)
        positive, negative = (node_helpers.conditioning_set_values(c, {"reference_latents": [reference]}, append=True)
                              for c in (positive, negative))
        guided = model.clone()
        guided.set_model_sampler_cfg_function(normalized_cfg(norm_cfg_threshold))
        noise = comfy.sample.prepare_noise(latent_image, seed)
        callback = latent_preview.prepare_callback(guided, len(sigmas) - 1)
        samples = comfy.sample.sample_custom(
            guided, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, positive, negative, latent_image,
            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        return io.NodeOutput({"samples": samples})
