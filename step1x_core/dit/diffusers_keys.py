"""The diffusers layout of the Step1X-Edit DiT (``Step1XEditTransformer2DModel``) as tables, and its
conversion to the original keys, which is what the loader runs on.

Three kinds of difference: one-to-one renames, fused tensors (the original's qkv and linear1 are the
diffusers q, k, v (and proj_mlp) concatenated along the output dimension), and the final layer's
modulation, whose two halves are stored in the other order.
"""

from __future__ import annotations

import functools
import re

import torch
from torch import Tensor

__all__ = ["FUSED", "RENAMES", "SWAPPED_HALVES", "UNCHANGED", "diffusers_to_original", "is_diffusers_layout",
           "original_to_diffusers"]

# One-to-one renames, original name pattern -> diffusers name pattern ({n} is the block index).
RENAMES = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_embed.in_layer",
    "time_in.out_layer": "time_embed.out_layer",
    "vector_in.in_layer": "vec_embed.in_layer",
    "vector_in.out_layer": "vec_embed.out_layer",
    "final_layer.linear": "proj_out",
    "double_blocks.{n}.img_mod.lin": "transformer_blocks.{n}.norm1.linear",
    "double_blocks.{n}.txt_mod.lin": "transformer_blocks.{n}.norm1_context.linear",
    "double_blocks.{n}.img_attn.proj": "transformer_blocks.{n}.attn.to_out.0",
    "double_blocks.{n}.txt_attn.proj": "transformer_blocks.{n}.attn.to_add_out",
    "double_blocks.{n}.img_mlp.0": "transformer_blocks.{n}.ff.net.0.proj",
    "double_blocks.{n}.img_mlp.2": "transformer_blocks.{n}.ff.net.2",
    "double_blocks.{n}.txt_mlp.0": "transformer_blocks.{n}.ff_context.net.0.proj",
    "double_blocks.{n}.txt_mlp.2": "transformer_blocks.{n}.ff_context.net.2",
    "double_blocks.{n}.img_attn.norm.query_norm.scale": "transformer_blocks.{n}.attn.norm_q.weight",
    "double_blocks.{n}.img_attn.norm.key_norm.scale": "transformer_blocks.{n}.attn.norm_k.weight",
    "double_blocks.{n}.txt_attn.norm.query_norm.scale": "transformer_blocks.{n}.attn.norm_added_q.weight",
    "double_blocks.{n}.txt_attn.norm.key_norm.scale": "transformer_blocks.{n}.attn.norm_added_k.weight",
    "single_blocks.{n}.modulation.lin": "single_transformer_blocks.{n}.norm.linear",
    "single_blocks.{n}.linear2": "single_transformer_blocks.{n}.proj_out",
    "single_blocks.{n}.norm.query_norm.scale": "single_transformer_blocks.{n}.attn.norm_q.weight",
    "single_blocks.{n}.norm.key_norm.scale": "single_transformer_blocks.{n}.attn.norm_k.weight",
}
# Fused original weights and the diffusers pieces they are concatenated from (output dim 0).
FUSED = {
    "double_blocks.{n}.img_attn.qkv": ["transformer_blocks.{n}.attn.to_" + c for c in "qkv"],
    "double_blocks.{n}.txt_attn.qkv": ["transformer_blocks.{n}.attn.add_" + c + "_proj" for c in "qkv"],
    "single_blocks.{n}.linear1": ["single_transformer_blocks.{n}.attn.to_" + c for c in "qkv"]
    + ["single_transformer_blocks.{n}.proj_mlp"],
}
# Same names in both layouts: the connector, and v1.2's text_token_mapping.
UNCHANGED = ("connector.", "text_token_mapping.")
# diffusers' AdaLayerNormContinuous chunks (scale, shift); the original final layer (shift, scale).
SWAPPED_HALVES = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def block_indices(keys, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def param_suffixes(sd: dict[str, Tensor], base: str) -> list[str]:
    return [s for s in ("weight", "bias", "scale") if f"{base}.{s}" in sd]


def swap_halves(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def expand_pattern(pattern: str, counts: dict[str, int]) -> list[tuple[str, int | None]]:
    """A key pattern with {n} -> one (name, n) per block of its kind; a plain name -> itself."""
    if "{n}" not in pattern:
        return [(pattern, None)]
    return [(pattern.format(n=n), n) for n in range(counts[pattern.split(".")[0]])]


def is_diffusers_layout(sd: dict[str, Tensor]) -> bool:
    return "x_embedder.weight" in sd or any(k.startswith("transformer_blocks.") for k in sd)


def diffusers_to_original(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Convert a diffusers-layout (`Step1XEditTransformer2DModel`) state dict to the original keys."""
    out = {k: v for k, v in sd.items() if k.startswith(UNCHANGED)}
    counts = {"double_blocks": len(block_indices(sd, "transformer_blocks")),
              "single_blocks": len(block_indices(sd, "single_transformer_blocks"))}
    expand = functools.partial(expand_pattern, counts=counts)
    for orig_pattern, diff_pattern in RENAMES.items():
        for orig, n in expand(orig_pattern):
            diff = diff_pattern.format(n=n)
            if diff in sd:  # a full tensor name (the norm scales)
                out[orig] = sd[diff]
            for suffix in param_suffixes(sd, diff):
                out[f"{orig}.{suffix}"] = sd[f"{diff}.{suffix}"]
    for orig_pattern, pieces in FUSED.items():
        for orig, n in expand(orig_pattern):
            names = [p.format(n=n) for p in pieces]
            for suffix in param_suffixes(sd, names[0]):
                parts = [sd.get(f"{name}.{suffix}") for name in names]
                if all(part is not None for part in parts):  # else left out: the file check names the missing piece
                    out[f"{orig}.{suffix}"] = torch.cat(parts, dim=0)
    orig, diff = SWAPPED_HALVES
    for suffix in param_suffixes(sd, diff):
        out[f"{orig}.{suffix}"] = swap_halves(sd[f"{diff}.{suffix}"])
    return out


def original_to_diffusers(sd: dict[str, Tensor], hidden_size: int) -> dict[str, Tensor]:
    """The inverse of `diffusers_to_original`: the names (and shapes, for meta tensors) a diffusers-layout file
    holds, for the file check and for writing diffusers-layout test files. ``hidden_size`` splits the fused
    tensors (q, k, v are ``hidden_size`` rows each; the single blocks' MLP gets the rest)."""
    out = {k: v for k, v in sd.items() if k.startswith(UNCHANGED)}
    expand = functools.partial(expand_pattern, counts={"double_blocks": len(block_indices(sd, "double_blocks")),
                                                       "single_blocks": len(block_indices(sd, "single_blocks"))})
    for orig_pattern, diff_pattern in RENAMES.items():
        for orig, n in expand(orig_pattern):
            diff = diff_pattern.format(n=n)
            if orig in sd:
                out[diff] = sd[orig]
            for suffix in param_suffixes(sd, orig):
                out[f"{diff}.{suffix}"] = sd[f"{orig}.{suffix}"]
    for orig_pattern, pieces in FUSED.items():
        for orig, n in expand(orig_pattern):
            names = [p.format(n=n) for p in pieces]
            for suffix in param_suffixes(sd, orig):
                fused = sd[f"{orig}.{suffix}"]
                sizes = [hidden_size] * 3 + [fused.shape[0] - 3 * hidden_size] * (len(names) - 3)
                for name, part in zip(names, torch.split(fused, sizes, dim=0)):
                    out[f"{name}.{suffix}"] = part
    orig, diff = SWAPPED_HALVES
    for suffix in param_suffixes(sd, orig):
        out[f"{diff}.{suffix}"] = swap_halves(sd[f"{orig}.{suffix}"])
    return out
