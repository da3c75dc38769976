"""The official Step1X-Edit schedule as ComfyUI SIGMAS, and the sigmas the Step1X-Edit Sampler runs.

The official schedule is FLUX's time shift with mu read from the target's token count (0.5 at 256 tokens,
1.15 at 4096, on that line beyond), on a uniform grid of t from 1 to 0. ComfyUI's ModelSamplingFlux node
computes the same shift from a width and height; with it, the Step1X-Edit Sampler takes that node's shift
instead of its own (so the node takes effect), on the same grid.
"""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..step1x_core.sampling.official import get_schedule, img2img_start
from .types import CATEGORY

logger = logging.getLogger(__name__)


def _keep_denoised_part(schedule: list[float], denoise: float) -> torch.Tensor:
    """denoise < 1 keeps the schedule's last part, as the official img2img does."""
    if denoise < 1.0:
        schedule = schedule[img2img_start(schedule, denoise):]
    return torch.tensor(schedule, dtype=torch.float32)


def official_sigmas(latent: torch.Tensor, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The official shifted schedule for this latent's size (steps + 1 values from 1 to 0)."""
    tokens = ((latent.shape[-2] + 1) // 2) * ((latent.shape[-1] + 1) // 2)
    return _keep_denoised_part(get_schedule(steps, tokens), denoise)


def sampler_sigmas(model, latent: torch.Tensor, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The official schedule, or, when a ModelSampling* node patched the model, that node's sigmas on the
    official grid of t (``percent_to_sigma``)."""
    patched = model.object_patches.get("model_sampling")
    if patched is None:
        return official_sigmas(latent, steps, denoise)
    logger.info("Step1X-Edit Sampler: using the model's %s (shift %s) instead of the official size-dependent "
                "shift", type(patched).__name__, getattr(patched, "shift", "?"))
    schedule = [float(patched.percent_to_sigma(i / steps)) for i in range(steps + 1)]
    return _keep_denoised_part(schedule, denoise)


class Step1XEditScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditScheduler",
            display_name="Step1X-Edit Scheduler",
            category=CATEGORY,
            description="The official Step1X-Edit schedule (FLUX's time shift, set by the image's size) as SIGMAS, "
                        "for SamplerCustomAdvanced / SamplerCustom with the Euler sampler, ReferenceLatent and "
                        "Step1X-Edit Normalized CFG: the native path to the Step1X-Edit Sampler's result.",
            inputs=[
                io.Latent.Input("latent", tooltip="The reference latent (VAEEncode of the scaled image): its size sets "
                                                  "the shift."),
                io.Int.Input("steps", default=28, min=1, max=200, tooltip="Denoising steps; the official setting is 28."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="1.0 runs the whole schedule; lower values keep its last part (start from "
                                       "the noised input image: pass the reference latent as the sampler's latent)."),
            ],
            outputs=[io.Sigmas.Output(tooltip="steps + 1 sigmas from 1 to 0 (fewer with denoise < 1).")],
        )

    @classmethod
    def execute(cls, latent, steps, denoise) -> io.NodeOutput:
        return io.NodeOutput(official_sigmas(latent["samples"], steps, denoise))
