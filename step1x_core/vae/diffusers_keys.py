"""The diffusers ``AutoencoderKL`` layout of FLUX's AE (how the v1.1/v1.2 diffusers releases ship ``vae/``),
and its conversion to BFL's ``ae.safetensors`` names, which the model runs on.

Renames are patterns ({i}, {j} block numbers); the decoder's levels are numbered the other way round
(diffusers' up_blocks.0 is the coarsest); the mid-block attention is Linear there and a 1x1 conv here.
"""

from __future__ import annotations

import re

from torch import Tensor

__all__ = ["diffusers_vae_to_bfl", "is_diffusers_vae"]

# diffusers pattern -> BFL pattern, tried in order; {i}/{j} match block numbers.
_RENAMES = (
    ("{side}.down_blocks.{i}.resnets.{j}.", "{side}.down.{i}.block.{j}."),
    ("{side}.down_blocks.{i}.downsamplers.0.", "{side}.down.{i}.downsample."),
    ("{side}.up_blocks.{i}.resnets.{j}.", "{side}.up.{I}.block.{j}."),
    ("{side}.up_blocks.{i}.upsamplers.0.", "{side}.up.{I}.upsample."),
    ("{side}.mid_block.resnets.0.", "{side}.mid.block_1."),
    ("{side}.mid_block.resnets.1.", "{side}.mid.block_2."),
    ("{side}.mid_block.attentions.0.group_norm.", "{side}.mid.attn_1.norm."),
    ("{side}.mid_block.attentions.0.to_q.", "{side}.mid.attn_1.q."),
    ("{side}.mid_block.attentions.0.to_k.", "{side}.mid.attn_1.k."),
    ("{side}.mid_block.attentions.0.to_v.", "{side}.mid.attn_1.v."),
    ("{side}.mid_block.attentions.0.to_out.0.", "{side}.mid.attn_1.proj_out."),
    ("{side}.conv_norm_out.", "{side}.norm_out."),
)
_ATTENTION_LINEARS = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def is_diffusers_vae(keys) -> bool:
    return any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in keys)


def _compile(pattern: str) -> re.Pattern:
    regex = re.escape(pattern).replace(r"\{side\}", r"(?P<side>encoder|decoder)")
    return re.compile("^" + regex.replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)"))


_COMPILED = [(_compile(src), dst) for src, dst in _RENAMES]


def _rename(key: str, up_levels: int) -> str:
    for pattern, target in _COMPILED:
        match = pattern.match(key)
        if match:
            fields = match.groupdict()
            if "i" in fields:
                fields["I"] = str(up_levels - 1 - int(fields["i"]))
            return target.format(**fields) + key[match.end():].replace("conv_shortcut.", "nin_shortcut.")
    return key  # conv_in, conv_out and the norm of the conv_out side keep their names


def diffusers_vae_to_bfl(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers-layout FLUX AE state dict in BFL's names and shapes."""
    up_levels = len({m.group(1) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    out = {}
    for key, tensor in sd.items():
        name = _rename(key, up_levels)
        if _ATTENTION_LINEARS.search(name) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[name] = tensor
    return out
