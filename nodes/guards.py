"""Checks where the Step1X-Edit graph meets user input: finite numbers and latents at the sampler, an encoder
that fits the connector, LoRAs that really patched something, and a sampler that stops on the first NaN step.

ComfyUI's API accepts NaN for a FLOAT input (it passes every min/max check), LoraLoaderModelOnly accepts a NaN
strength, and a NaN anywhere ends as an all-black image reported as a success. The engine's checks
(``step1x_core.finite``) are applied here to what the nodes receive.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from ..step1x_core.pipeline.fit import check_encoder_width
from ..step1x_core.sampling.loop import non_finite_cause
from ..step1x_core.finite import NonFiniteError, all_finite, describe_non_finite, require_finite_number, \
    require_finite_tensor
from .comfy_model import IMAGE_MODEL, TXT_MASK, conditioning_problem
from .patcher import patch_report

logger = logging.getLogger(__name__)

__all__ = ["check_connector_inputs", "check_sampler_inputs", "report_patches", "stop_on_non_finite", "with_nan_stop"]


def _tensors(value) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def check_patches(model) -> None:
    """LoRA strengths must be finite numbers and LoRA weights finite tensors (a LoRA is small: one pass)."""
    for key, entries in model.patches.items():
        for strength, patch, strength_model, *_ in entries:
            for value in (strength, strength_model):
                require_finite_number(f"a LoRA's strength (on {key})", value,
                                      "set a finite strength_model in the LoRA loader")
            weights = getattr(patch, "weights", None)  # LoRA-type adapters; a merge's full tensors are not scanned
            for tensor in _tensors(weights):
                if not all_finite(tensor):
                    lora_keys = sorted(getattr(patch, "loaded_keys", ()))[:1]
                    raise NonFiniteError(f"the LoRA patching {key} holds {describe_non_finite(tensor)}"
                                         + (f" (in {lora_keys[0]})" if lora_keys else "")
                                         + ": the LoRA file is corrupt; download it again or remove the LoRA")


def _block_linear_count(model) -> int:
    dit = model.model.diffusion_model
    return sum(1 for name, module in dit.named_modules()
               if isinstance(module, torch.nn.Linear) and name.startswith(("double_blocks.", "single_blocks.")))


def report_patches(model) -> None:
    """Show on the running node how many DiT weights the LoRAs patched (0 or few: as a warning)."""
    report = patch_report(model)
    if report is None:
        return
    blocks = _block_linear_count(model)
    warn = True
    if report.patched == 0:
        text = ("LoRA: 0 DiT weights patched: none of its keys matches a Step1X-Edit layer (a LoRA for "
                "another model?); it has no effect")
    elif report.patched < blocks / 4:
        text = (f"LoRA: only {report.patched} DiT weights patched (the transformer blocks have {blocks} "
                "Linear layers): most of its keys match no Step1X-Edit layer")
    else:
        strengths = ", ".join(f"{strength:g}" for strength in report.strengths)
        text, warn = f"LoRA: {report.patched} DiT weights patched (strength {strengths})", False
    (logger.warning if warn else logger.info)("Step1X-Edit: %s", text)
    _show(text)


def _show(text: str) -> None:
    """Progress text on the node that is running (the UI shows it under the node)."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer

        context = get_executing_context()
        if PromptServer.instance is not None and context is not None:
            PromptServer.instance.send_progress_text(text, context.node_id)
    except (ImportError, AttributeError):  # no server (a script calling execute): the log line is all there is
        pass


def require_step1x_model(model, node: str) -> None:
    """A MODEL from another loader (FLUX, SDXL) would fail deep inside the first step."""
    config = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", {}) or {}
    if config.get("image_model") != IMAGE_MODEL:
        raise ValueError(f"{node}: the model is not a Step1X-Edit DiT ({type(getattr(model, 'model', model)).__name__}"
                         "); load it with Load Step1X-Edit DiT or Load Diffusion Model")


def check_sampler_inputs(model, positive: list, negative: list, reference: Tensor, **numbers: float) -> None:
    """Everything the sampler gets, before any step: the model, finite settings, a FLUX-VAE latent, conditioning
    from the Step1X-Edit Connector, and LoRAs."""
    require_step1x_model(model, "Step1X-Edit Sampler")
    for name, value in numbers.items():
        require_finite_number(name, value)
    channels = model.model.diffusion_model.params.in_channels // 4  # 2x2 patches
    if reference.ndim != 4 or reference.shape[1] != channels:
        raise ValueError(f"reference_latent has shape {list(reference.shape)}, but Step1X-Edit edits the FLUX VAE's "
                         f"{channels}-channel latents [batch, {channels}, height/8, width/8]: encode the image with "
                         "VAE Encode and the FLUX VAE (ae.safetensors)")
    require_finite_tensor("reference_latent", reference, "the VAE Encode of the input image produced it (a broken "
                          "VAE file?), or it was loaded from a damaged latent file")
    width = model.model.diffusion_model.params.connector.in_channels
    for name, conditioning in (("positive", positive), ("negative", negative)):
        for entry in conditioning:
            if TXT_MASK not in entry[1]:
                raise ValueError(f"the {name} conditioning: {conditioning_problem(entry[0], None, width)}")
            for tensor in _tensors([entry[0], *[v for v in entry[1].values() if isinstance(v, Tensor)]]):
                require_finite_tensor(f"the {name} conditioning", tensor, "the node that made it produced NaN/Inf")
    check_patches(model)
    report_patches(model)


def check_connector_inputs(model, embeddings) -> None:
    """The encoder's hidden states must be finite and as wide as the connector reads."""
    require_step1x_model(model, "Step1X-Edit Connector")
    dit = model.model.diffusion_model
    check_encoder_width(embeddings.cond.hidden.shape[-1], dit.params.connector.in_channels,
                        "the Qwen2.5-VL encoder (its embeddings)", "the Step1X-Edit DiT")
    for name, prompt in (("instruction", embeddings.cond), ("negative", embeddings.uncond)):
        require_finite_tensor(f"the Qwen2.5-VL embeddings of the {name}", prompt.hidden, "the encoder's arithmetic "
                              "(Qwen2.5-VL overflows in float16: choose bfloat16 or float32 in its loader)")


def with_nan_stop(model):
    """``model`` with ``stop_on_non_finite`` among its post-CFG functions (the DiT loader adds it; a MODEL from
    Load Diffusion Model gets it here), cloned only when it lacks it."""
    if stop_on_non_finite in model.model_options.get("sampler_post_cfg_function", []):
        return model
    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(stop_on_non_finite)
    return patched


def stop_on_non_finite(args: dict) -> Tensor:
    """A sampler post-CFG function: the denoised latent unchanged, or a NonFiniteError naming the likely cause."""
    denoised = args["denoised"]
    if all_finite(denoised):
        return denoised
    raise NonFiniteError(f"sampling stopped at sigma {float(args['sigma'].flatten()[0]):.3f}: the denoised latent "
                         f"holds {describe_non_finite(denoised)}; {_likely_cause(args)}")


def _likely_cause(args: dict) -> str:
    """What ComfyUI's CFG adds to the engine's rule (``non_finite_cause``): the cfg value and CFG functions."""
    if not math.isfinite(float(args["cond_scale"])):
        return f"cfg is {args['cond_scale']}: set a finite cfg"
    outputs = [args["cond_denoised"], args.get("uncond_denoised")]
    if all_finite(args["input"]) and all(o is None or all_finite(o) for o in outputs):
        return f"the CFG combination (cfg {args['cond_scale']}) or a sampler CFG function produced it"
    return non_finite_cause(args["input"], (), args["model"].diffusion_model)
