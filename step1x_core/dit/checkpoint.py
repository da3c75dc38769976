"""Step1X-Edit DiT checkpoints: read, recognise, convert and load.

Everything is decided from keys and shapes, never from file names:
- layout: original (`double_blocks.*`) or diffusers (`transformer_blocks.*`, converted on load);
- version: v1.0 has `connector.scale_factor`, v1.1 does not;
- sizes: hidden from `img_in`, head dim from the QK-norm width, block counts by counting;
- storage: fp8 (float8_e4m3fn) files keep fp8 weights and are cast one layer at a time.
Files are memory-mapped (safetensors), and the model is built on the meta device and takes the
mapped tensors as its parameters, so loading holds about one copy of the weights.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .params import ConnectorParams, DiTParams
from .model import Step1XEditDiT
from ..ops import FP8_DTYPES, manual_cast, to_dtype
from ..ops import fp8_matmul as fp8_matmul_ops

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
# Wrappers other tools put around the DiT keys (ComfyUI saves, diffusers pipelines).
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
CONNECTOR_HEAD_DIM = 128


class CheckpointError(ValueError):
    """A file that cannot be used as a Step1X-Edit DiT; the message says what was found and why."""


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Memory-map a .safetensors file; refuse pickles and explain unreadable files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; expected a single .safetensors file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: {path.suffix} files are Python pickles, which can run code when loaded; "
            "only .safetensors files are loaded. Download the .safetensors release of the model."
        )
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path.name}: cannot be read as safetensors ({err}); {describe_unreadable(path)}"
        ) from err


def describe_unreadable(path: str | Path) -> str:
    """What an unreadable .safetensors file holds instead, and the fix (for error messages)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        head = b"?"
    if not head:
        return "the file is empty (an interrupted download?); download it again"
    if head.startswith(b"version https://git-lfs"):
        return ("the file is a Git LFS pointer, not the weights (a clone without git-lfs?); run `git lfs pull` "
                "or download the file itself")
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "the file is an HTML page (a login or error page saved by a failed download); download it again"
    return "the file is truncated or corrupt; download it again (`step1x-edit-download` resumes)"


def strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove a wrapper prefix shared by the DiT keys (e.g. ComfyUI's `model.diffusion_model.`)."""
    for prefix in KEY_PREFIXES:
        marker = prefix + "img_in.weight", prefix + "x_embedder.weight"
        if any(m in sd for m in marker):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


# --- diffusers layout ----------------------------------------------------------------------------
# One-to-one renames, original name pattern -> diffusers name pattern ({n} is the block index).
_DIFFUSERS_RENAMES = {
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
_DIFFUSERS_FUSED = {
    "double_blocks.{n}.img_attn.qkv": ["transformer_blocks.{n}.attn.to_" + c for c in "qkv"],
    "double_blocks.{n}.txt_attn.qkv": ["transformer_blocks.{n}.attn.add_" + c + "_proj" for c in "qkv"],
    "single_blocks.{n}.linear1": ["single_transformer_blocks.{n}.attn.to_" + c for c in "qkv"]
    + ["single_transformer_blocks.{n}.proj_mlp"],
}
# diffusers' AdaLayerNormContinuous chunks (scale, shift); the original final layer (shift, scale).
_SWAPPED_HALVES = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def _block_indices(keys, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _param_suffixes(sd: dict[str, Tensor], base: str) -> list[str]:
    return [s for s in ("weight", "bias", "scale") if f"{base}.{s}" in sd]


def _swap_halves(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _expand(pattern: str, counts: dict[str, int]) -> list[tuple[str, int | None]]:
    """A key pattern with {n} -> one (name, n) per block of its kind; a plain name -> itself."""
    if "{n}" not in pattern:
        return [(pattern, None)]
    return [(pattern.format(n=n), n) for n in range(counts[pattern.split(".")[0]])]


def is_diffusers_layout(sd: dict[str, Tensor]) -> bool:
    return "x_embedder.weight" in sd or any(k.startswith("transformer_blocks.") for k in sd)


def diffusers_to_original(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Convert a diffusers-layout (`Step1XEditTransformer2DModel`) state dict to the original keys."""
    out = {k: v for k, v in sd.items() if k.startswith("connector.")}
    counts = {"double_blocks": len(_block_indices(sd, "transformer_blocks")),
              "single_blocks": len(_block_indices(sd, "single_transformer_blocks"))}
    expand = functools.partial(_expand, counts=counts)
    for orig_pattern, diff_pattern in _DIFFUSERS_RENAMES.items():
        for orig, n in expand(orig_pattern):
            diff = diff_pattern.format(n=n)
            if diff in sd:  # a full tensor name (the norm scales)
                out[orig] = sd[diff]
            for suffix in _param_suffixes(sd, diff):
                out[f"{orig}.{suffix}"] = sd[f"{diff}.{suffix}"]
    for orig_pattern, pieces in _DIFFUSERS_FUSED.items():
        for orig, n in expand(orig_pattern):
            names = [p.format(n=n) for p in pieces]
            for suffix in _param_suffixes(sd, names[0]):
                out[f"{orig}.{suffix}"] = torch.cat([sd[f"{name}.{suffix}"] for name in names], dim=0)
    orig, diff = _SWAPPED_HALVES
    for suffix in _param_suffixes(sd, diff):
        out[f"{orig}.{suffix}"] = _swap_halves(sd[f"{diff}.{suffix}"])
    return out


def original_to_diffusers(sd: dict[str, Tensor], params: DiTParams) -> dict[str, Tensor]:
    """The inverse of `diffusers_to_original` (used to write diffusers-layout test files)."""
    out = {k: v for k, v in sd.items() if k.startswith("connector.")}
    expand = functools.partial(_expand, counts={"double_blocks": params.depth,
                                                "single_blocks": params.depth_single_blocks})
    for orig_pattern, diff_pattern in _DIFFUSERS_RENAMES.items():
        for orig, n in expand(orig_pattern):
            diff = diff_pattern.format(n=n)
            if orig in sd:
                out[diff] = sd[orig]
            for suffix in _param_suffixes(sd, orig):
                out[f"{diff}.{suffix}"] = sd[f"{orig}.{suffix}"]
    for orig_pattern, pieces in _DIFFUSERS_FUSED.items():
        for orig, n in expand(orig_pattern):
            names = [p.format(n=n) for p in pieces]
            for suffix in _param_suffixes(sd, orig):
                fused = sd[f"{orig}.{suffix}"]
                sizes = [params.hidden_size] * 3 + [fused.shape[0] - 3 * params.hidden_size] * (len(names) - 3)
                for name, part in zip(names, torch.split(fused, sizes, dim=0)):
                    out[f"{name}.{suffix}"] = part
    orig, diff = _SWAPPED_HALVES
    for suffix in _param_suffixes(sd, orig):
        out[f"{diff}.{suffix}"] = _swap_halves(sd[f"{orig}.{suffix}"])
    return out


# --- recognising what a file is ------------------------------------------------------------------
def describe_foreign(sd: dict[str, Tensor]) -> str | None:
    """Name the kind of model a non-Step1X state dict looks like, or None if it could be ours."""
    keys = sd.keys()
    if "double_blocks.0.img_attn.qkv.weight" in sd and not any(k.startswith("connector.") for k in keys):
        kind = "a FLUX.1-dev DiT (has guidance_in)" if any(k.startswith("guidance_in.") for k in keys) \
            else "a FLUX.1 DiT without the Step1X-Edit connector"
        return kind
    if any(k.startswith(("encoder.conv_in", "decoder.conv_in", "encoder.down.")) for k in keys):
        return "a VAE (encoder/decoder weights)"
    if any(k.startswith(("input_blocks.", "model.diffusion_model.input_blocks.")) for k in keys):
        return "a Stable Diffusion (SD1.x/SD2/SDXL) UNet checkpoint"
    if any(k.startswith("down_blocks.") for k in keys):
        return "a diffusers UNet (Stable Diffusion / SDXL, 'down_blocks.*')"
    if any(k.startswith(("model.layers.", "visual.blocks.", "model.language_model.")) for k in keys):
        return "a language/vision model (Qwen-like text encoder weights)"
    return None


def _require(sd: dict[str, Tensor], *keys: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointError(f"missing tensors {missing}")


def infer_params(sd: dict[str, Tensor], version: str | None = None) -> DiTParams:
    """Read the DiT + connector configuration from an original-layout state dict."""
    _require(sd, "img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight",
             "connector.S.input_embedder.weight", "connector.global_proj_out.weight")
    hidden, in_channels = sd["img_in.weight"].shape
    depth = len(_block_indices(sd, "double_blocks"))
    depth_single = len(_block_indices(sd, "single_blocks"))
    norm_key = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    _require(sd, norm_key)
    head_dim = sd[norm_key].shape[0]
    if depth:
        mlp_hidden = sd["double_blocks.0.img_mlp.0.weight"].shape[0]
    else:
        mlp_hidden = sd["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden

    conn_hidden, conn_in = sd["connector.S.input_embedder.weight"].shape
    conn_blocks = _block_indices(sd, "connector.S.individual_token_refiner.blocks")
    conn_mlp = sd["connector.S.individual_token_refiner.blocks.0.mlp.fc1.weight"].shape[0] if conn_blocks else 4 * conn_hidden
    has_scale_factor = "connector.scale_factor" in sd
    detected = "v1.0" if has_scale_factor else "v1.1"
    if version is not None and version != detected:
        logger.warning("checkpoint looks like %s but version %s was requested; using %s", detected, version, version)
    version = version or detected

    connector = ConnectorParams(
        in_channels=conn_in, hidden_size=conn_hidden, num_heads=max(conn_hidden // CONNECTOR_HEAD_DIM, 1),
        depth=len(conn_blocks), mlp_ratio=conn_mlp / conn_hidden,
        pooled_dim=sd["connector.global_proj_out.weight"].shape[0], has_scale_factor=version == "v1.0",
    )
    return DiTParams(
        in_channels=in_channels, out_channels=sd["final_layer.linear.weight"].shape[0],
        vec_in_dim=sd["vector_in.in_layer.weight"].shape[1], context_in_dim=sd["txt_in.weight"].shape[1],
        hidden_size=hidden, mlp_ratio=mlp_hidden / hidden, num_heads=hidden // head_dim, depth=depth,
        depth_single_blocks=depth_single, axes_dim=rope_axes(head_dim),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd if depth else True,
        version=version, connector=connector,
    )


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX splits a 128-wide head as (16, 56, 56); other widths keep those proportions."""
    first, rest = head_dim // 8, head_dim - head_dim // 8
    axes = (first, rest // 2, rest - rest // 2)
    if head_dim % 16 or any(a % 2 for a in axes):
        raise CheckpointError(f"unsupported attention head width {head_dim}; Step1X-Edit uses 128")
    return axes


@dataclass
class LoadedCheckpoint:
    state_dict: dict[str, Tensor]  # original layout, prefix stripped
    params: DiTParams
    layout: str  # "original" or "diffusers"
    storage_dtype: torch.dtype  # dtype of the big weight matrices in the file


def read_dit_checkpoint(path: str | Path, version: str | None = None) -> LoadedCheckpoint:
    """Read and recognise a Step1X-Edit DiT file (any layout, any storage dtype)."""
    path = Path(path)
    sd = strip_prefix(read_safetensors(path))
    layout = "original"
    if is_diffusers_layout(sd):
        sd, layout = diffusers_to_original(sd), "diffusers"
    foreign = describe_foreign(sd)
    if foreign or "img_in.weight" not in sd or not any(k.startswith("connector.") for k in sd):
        found = foreign or f"{len(sd)} tensors such as {sorted(sd)[:3]}"
        raise CheckpointError(
            f"{path.name} is not a Step1X-Edit DiT: found {found}. Expected the Step1X-Edit "
            "transformer (keys img_in.*, double_blocks.*, single_blocks.*, connector.*), e.g. "
            "step1x-edit-i1258.safetensors or step1x-edit-v1p1-official.safetensors in models/diffusion_models/."
        )
    try:
        params = infer_params(sd, version)
    except (CheckpointError, ValueError, KeyError, IndexError) as err:
        raise CheckpointError(f"{path.name}: incomplete or inconsistent Step1X-Edit checkpoint: {err}") from err
    storage = sd["img_in.weight"].dtype
    return LoadedCheckpoint(sd, params, layout, storage)


def build_dit(ckpt: LoadedCheckpoint, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
              attn_fn=None, fp8_matmul: bool = False) -> Step1XEditDiT:
    """Instantiate the DiT and give it the checkpoint's tensors.

    dtype None keeps the stored dtype. fp8 storage (or an fp8 `dtype`) keeps fp8 weights and uses
    per-layer casting; run such a model with inputs in the compute dtype (bf16 or fp32).
    `fp8_matmul` multiplies float8_e4m3fn Linear weights in fp8 (torch._scaled_mm) instead: faster on
    GPUs with fp8 tensor cores, lossy (activations are quantised too), off by default.
    """
    target = dtype or ckpt.storage_dtype
    fp8 = target in FP8_DTYPES
    if fp8_matmul and target != torch.float8_e4m3fn:
        raise ValueError(f"fp8 matmul needs float8_e4m3fn weights, but the DiT runs with {target} weights: "
                         "choose the fp8 weight dtype (--weight-dtype float8_e4m3fn) or an fp8 checkpoint")
    operations = fp8_matmul_ops if fp8_matmul else manual_cast if fp8 else nn
    with torch.device("meta"):
        model = Step1XEditDiT(ckpt.params, attn_fn=attn_fn, operations=operations)
    sd = ckpt.state_dict
    if ckpt.params.version == "v1.1":
        sd = {k: v for k, v in sd.items() if k != "connector.scale_factor"}
    sd = {k: _converted(k, v, target, device) for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint tensors do not fit the inferred model: {err}") from err
    return model.eval().requires_grad_(False)


def _converted(key: str, t: Tensor, target: torch.dtype, device) -> Tensor:
    # fp8 models keep small norm/scale tensors and biases in a wider type: they are cast per use
    # anyway, and e4m3 would lose the connector's scale_factor and RMSNorm scales.
    if target in FP8_DTYPES and (t.ndim < 2 or key.endswith(("scale", "scale_factor"))):
        target = t.dtype if t.dtype not in FP8_DTYPES else torch.bfloat16
    return to_dtype(t.to(device), target)


def load_dit(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             version: str | None = None, attn_fn=None, fp8_matmul: bool = False) -> Step1XEditDiT:
    """Load a Step1X-Edit DiT file (original or diffusers layout, v1.0/v1.1, bf16/fp32/fp8)."""
    ckpt = read_dit_checkpoint(path, version)
    model = build_dit(ckpt, dtype=dtype, device=device, attn_fn=attn_fn, fp8_matmul=fp8_matmul)
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in ckpt.state_dict.values())
    p = ckpt.params
    logger.info("Step1X-Edit DiT %s: %s layout, %s, hidden %d, %d+%d blocks, stored %s, running as %s",
                Path(path).name, ckpt.layout, p.version, p.hidden_size, p.depth, p.depth_single_blocks,
                dict(dtypes), str(dtype or ckpt.storage_dtype).replace("torch.", ""))
    return model
