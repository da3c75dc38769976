"""What kind of model a file holds, from its tensor names alone: the one table every loader consults.

A loader accepts its own kind and, for any other, says what the file is and where it belongs, so a
FLUX DiT in the VAE slot or a CLIP in the Qwen slot gets a message that names both.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Callable

__all__ = ["Kind", "identify", "STEP1X_DIT", "FLUX_VAE", "SD_VAE", "DIFFUSERS_VAE", "QWEN2"]


@dataclass(frozen=True)
class Kind:
    name: str
    description: str  # completes "the file is ..."


class _Names:
    """Key-name queries that also see keys under a wrapper prefix (ComfyUI's ``model.diffusion_model.``)."""

    def __init__(self, names: Collection[str]) -> None:
        self.names = set(names)

    def has(self, *fragments: str) -> bool:
        return any(n.startswith(fragments) or any(f".{f}" in n for f in fragments) for n in self.names)

    def ends(self, suffix: str) -> bool:
        return any(n == suffix or n.endswith("." + suffix) for n in self.names)


STEP1X_DIT = Kind("step1x_dit", "the Step1X-Edit DiT (it belongs in models/diffusion_models/ and the Load "
                                "Step1X-Edit DiT node)")
FLUX_DEV_DIT = Kind("flux_dev_dit", "a FLUX.1-dev DiT (has guidance_in)")
FLUX_DIT = Kind("flux_dit", "a FLUX.1 DiT without the Step1X-Edit connector")
DIFFUSERS_DIT = Kind("diffusers_dit", "a diffusers transformer ('transformer_blocks.*') without the Step1X-Edit "
                                      "connector")
FULL_SD = Kind("full_sd", "a full diffusion checkpoint of Stable Diffusion (SD1.x/SD2/SDXL: UNet, VAE and text "
                          "encoders in one file, 'model.diffusion_model.*')")
SD_UNET = Kind("sd_unet", "a Stable Diffusion (SD1.x/SD2/SDXL) UNet ('input_blocks.*')")
DIFFUSERS_VAE = Kind("diffusers_vae", "a diffusers AutoencoderKL ('encoder.down_blocks.*')")
DIFFUSERS_UNET = Kind("diffusers_unet", "a diffusers UNet (Stable Diffusion / SDXL, 'down_blocks.*')")
SD_VAE = Kind("sd_vae", "an SD1.x/SDXL-style VAE (quant_conv layers)")
FLUX_VAE = Kind("flux_vae", "a VAE (for example FLUX's ae.safetensors, which belongs in models/vae/)")
CLIP = Kind("clip", "a CLIP text encoder")
T5 = Kind("t5", "a T5 text encoder")
QWEN3 = Kind("qwen3", "a Qwen3-family model (its attention has q_norm), not Qwen2.5-VL")
GEMMA = Kind("gemma", "a Gemma model, not Qwen2.5-VL")
LLAMA = Kind("llama", "a Llama-family model without attention biases (e.g. HunyuanVideo's llava-llama-3-8B), "
                      "not Qwen2.5-VL")
QWEN2 = Kind("qwen2", "a Qwen2 / Qwen2.5 language model (a text encoder, which belongs in models/text_encoders/)")

# First match wins: the specific kinds come before the families they resemble.
_RULES: tuple[tuple[Kind, Callable[[_Names], bool]], ...] = (
    (STEP1X_DIT, lambda n: n.has("connector.") and n.has("img_in.", "double_blocks.", "x_embedder.",
                                                          "transformer_blocks.")),
    (FLUX_DEV_DIT, lambda n: n.has("double_blocks.") and n.has("guidance_in.")),
    (FLUX_DIT, lambda n: n.has("double_blocks.", "single_blocks.")),
    (DIFFUSERS_DIT, lambda n: n.has("transformer_blocks.")),
    (FULL_SD, lambda n: n.has("first_stage_model.", "conditioner.", "cond_stage_model.")),
    (SD_UNET, lambda n: n.has("input_blocks.")),
    (DIFFUSERS_VAE, lambda n: n.has("encoder.down_blocks.", "decoder.up_blocks.")),
    (DIFFUSERS_UNET, lambda n: n.has("down_blocks.")),
    (SD_VAE, lambda n: n.has("encoder.conv_in.") and n.has("quant_conv.", "post_quant_conv.")),
    (FLUX_VAE, lambda n: n.has("encoder.conv_in.", "decoder.conv_in.", "encoder.down.", "decoder.up.")),
    (CLIP, lambda n: n.has("text_model.encoder.", "transformer.resblocks.")),
    (T5, lambda n: n.has("encoder.block.") or n.ends("shared.weight")),
    (QWEN3, lambda n: n.ends("layers.0.self_attn.q_norm.weight")),
    (GEMMA, lambda n: n.ends("layers.0.post_feedforward_layernorm.weight")),
    (LLAMA, lambda n: n.ends("layers.0.self_attn.k_proj.weight") and not n.ends("layers.0.self_attn.k_proj.bias")),
    (QWEN2, lambda n: n.ends("embed_tokens.weight") or n.has("visual.blocks.")),
)


def identify(names: Collection[str] | Mapping[str, object]) -> Kind | None:
    """The kind of model whose tensors have these names, or None when nothing known matches."""
    found = _Names(names)
    return next((kind for kind, matches in _RULES if matches(found)), None)
