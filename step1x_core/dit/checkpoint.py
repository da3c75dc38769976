"""Step1X-Edit DiT checkpoints: recognise a state dict and check it, tensor by tensor, against the model its
anchors describe (``loading`` reads the files and builds the model). What a state dict is, is told from its
keys and shapes alone: the layout by its block names, the version by ``connector.scale_factor`` (v1.0) or
``text_token_mapping`` (v1.2), the sizes by the anchors' shapes and by counting blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..formats.expected import check_tensors
from ..formats.identify import STEP1X_DIT, identify
from ..formats.safetensors_file import ModelFileError
from ..ops import FP8_DTYPES
from .diffusers_config import ShapeFreeFacts, disagreements, shape_free_facts
from .diffusers_keys import block_indices, diffusers_to_original, is_diffusers_layout
from .expected import DIT_FIX, dit_expected
from .params import ConnectorParams, DiTParams
from ..versions import Version

logger = logging.getLogger(__name__)

# Wrappers other tools put around the DiT keys (ComfyUI saves, diffusers pipelines).
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
CONNECTOR_HEAD_DIM = 128


class CheckpointError(ModelFileError):
    """A file that cannot be used as a Step1X-Edit DiT; the message says what was found and why."""


def strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove a wrapper prefix shared by the DiT keys (e.g. ComfyUI's `model.diffusion_model.`)."""
    for prefix in KEY_PREFIXES:
        marker = prefix + "img_in.weight", prefix + "x_embedder.weight"
        if any(m in sd for m in marker):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _require(sd: dict[str, Tensor], *keys: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointError(f"missing tensors {missing}")


def detect_version(sd: dict[str, Tensor]) -> Version:
    """v1.0 has the connector's scale_factor, v1.2 the text_token_mapping; v1.1 neither."""
    if "connector.scale_factor" in sd:
        return Version.V1_0
    return Version.V1_2 if "text_token_mapping.weight" in sd else Version.V1_1


def _block_count(sd: dict[str, Tensor], prefix: str) -> int:
    """Blocks 0..n-1 as the highest number shows them: a gap is then a missing block the file check names."""
    indices = block_indices(sd, prefix)
    return indices[-1] + 1 if indices else 0


def infer_params(sd: dict[str, Tensor], version: Version | str | None = None,
                 config: dict | None = None) -> DiTParams:
    """Read the DiT + connector configuration from an original-layout state dict; ``config`` (a diffusers
    config.json) gives the head counts and RoPE split, which no shape carries, and is checked against it.

    Only a few anchor tensors are read (widths, block counts, head size); the file check then holds every
    other tensor against the model they describe, so a wrong tensor is named instead of changing the model.
    """
    _require(sd, "img_in.weight", "final_layer.linear.weight", "connector.S.input_embedder.weight",
             "connector.global_proj_out.weight")
    hidden, in_channels = sd["img_in.weight"].shape
    depth = _block_count(sd, "double_blocks")
    depth_single = _block_count(sd, "single_blocks")
    norm_key = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    _require(sd, norm_key)
    head_dim = sd[norm_key].shape[0]
    if depth:
        mlp_hidden = sd["double_blocks.0.img_mlp.0.weight"].shape[0]
    else:
        mlp_hidden = sd["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden

    conn_hidden, conn_in = sd["connector.S.input_embedder.weight"].shape
    conn_depth = _block_count(sd, "connector.S.individual_token_refiner.blocks")
    fc1 = "connector.S.individual_token_refiner.blocks.0.mlp.fc1.weight"
    conn_mlp = sd[fc1].shape[0] if conn_depth else 4 * conn_hidden
    pooled = sd["connector.global_proj_out.weight"].shape[0]
    detected = detect_version(sd)
    version = Version.parse(version) if version is not None else None
    if version is not None and version != detected:
        logger.warning("checkpoint looks like %s but version %s was requested; using %s", detected, version, version)
    version = version or detected

    if config is None:  # the released models' 128-wide heads
        facts = ShapeFreeFacts(hidden // head_dim, rope_axes(head_dim), max(conn_hidden // CONNECTOR_HEAD_DIM, 1))
    else:
        facts = shape_free_facts(config)
        problems = disagreements(config, {
            "num_layers": depth, "num_single_layers": depth_single, "attention_head_dim": head_dim,
            "num_attention_heads": hidden // head_dim, "in_channels": in_channels, "joint_attention_dim": conn_hidden,
            "connector_in_channels": conn_in, "connector_hidden_size": conn_hidden, "connector_depth": conn_depth,
            "vector_in_dim": pooled, "enable_text_token_mapping": "text_token_mapping.weight" in sd})
        if problems:
            raise CheckpointError("its config.json does not describe these weights: " + "; ".join(problems))

    connector = ConnectorParams(
        in_channels=conn_in, hidden_size=conn_hidden, num_heads=facts.connector_heads,
        depth=conn_depth, mlp_ratio=conn_mlp / conn_hidden, pooled_dim=pooled,
    )
    # The DiT reads what the connector writes: txt_in's and vector_in's widths are the connector's.
    return DiTParams(
        in_channels=in_channels, out_channels=sd["final_layer.linear.weight"].shape[0],
        vec_in_dim=connector.pooled_dim, context_in_dim=connector.hidden_size,
        hidden_size=hidden, mlp_ratio=mlp_hidden / hidden, num_heads=facts.num_heads, depth=depth,
        depth_single_blocks=depth_single, axes_dim=facts.axes_dim,
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
    file_name: str = "the DiT file"  # for messages about single tensors (NaN found while casting)
    # A host's quantization data beside the weights (e.g. ComfyUI's per-layer scales and formats), by their
    # original names, unchecked: the host that asked for them reads them. The file's metadata likewise.
    side_tensors: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    # Weights kept quantized for the engine (GGUF blocks, ComfyUI's mixed fp8), by name; their state_dict entries
    # are then meta tensors of the right shape (see ``quantized``).
    quantized: dict = field(default_factory=dict)


SideTensor = Callable[[str], bool]  # says which tensor names are a host's quantization data, not weights


def recognise_dit(sd: dict[str, Tensor], name: str, version: Version | str | None = None,
                  config: dict | None = None, side_tensor: SideTensor | None = None) -> LoadedCheckpoint:
    """A state dict recognised as a Step1X-Edit DiT (any layout, prefix or storage dtype) and checked, tensor by
    tensor, against the model its anchors describe; ``name`` (the file) is for messages. Raises
    CheckpointError saying what the tensors are instead, or what is wrong with them.

    Names ``side_tensor`` accepts are a host's quantization data (scales, per-layer formats) kept apart and
    unchecked (original layout only); without it, such tensors are unknown names and the file is refused."""
    version = Version.parse(version) if version is not None else None
    sd = strip_prefix(sd)
    side = {key: tensor for key, tensor in sd.items() if side_tensor is not None and side_tensor(key)}
    if side:
        sd = {key: tensor for key, tensor in sd.items() if key not in side}
    kind = identify(sd)
    if kind is not STEP1X_DIT:
        found = kind.description if kind else f"{len(sd)} tensors such as {sorted(sd)[:3]}"
        raise CheckpointError(
            f"{name} is not a Step1X-Edit DiT: found {found}. Expected the Step1X-Edit "
            "transformer (keys img_in.*, double_blocks.*, single_blocks.*, connector.*), e.g. "
            "step1x-edit-i1258.safetensors or step1x-edit-v1p1-official.safetensors in models/diffusion_models/."
        )
    layout = "diffusers" if is_diffusers_layout(sd) else "original"
    if side and layout == "diffusers":
        raise CheckpointError(f"{name}: a quantized file in the diffusers layout; quantize the original layout "
                              "(double_blocks.*, single_blocks.*) instead")
    original = diffusers_to_original(sd) if layout == "diffusers" else sd
    try:
        params = infer_params(original, version, config)
    except (CheckpointError, ValueError, KeyError, IndexError) as err:
        raise CheckpointError(f"{name}: incomplete or inconsistent Step1X-Edit checkpoint: {err}. "
                              f"{DIT_FIX}") from err
    # Every tensor against the model the anchors describe (names, shapes, dtypes, block counts), before building.
    check_tensors(name, dit_expected(params, layout, detect_version(original)),
                  {k: tuple(t.shape) for k, t in sd.items()}, {k: t.dtype for k, t in sd.items()}, CheckpointError)
    return LoadedCheckpoint(original, params, layout, original["img_in.weight"].dtype, name, side)


def unused_by(version: Version, key: str) -> bool:
    """A tensor a model of ``version`` has no place for (a v1.0 file's scale_factor loaded as v1.1, say)."""
    if key == "connector.scale_factor":
        return not version.has_connector_scale_factor
    return key.startswith("text_token_mapping.") and not version.has_text_token_mapping


def kept_dtype(key: str, t: Tensor, target: torch.dtype) -> torch.dtype:
    """The dtype a tensor is kept in for ``target`` weights: fp8 models keep small norm/scale tensors and
    biases in a wider type (they are cast per use anyway, and e4m3 would lose the connector's scale_factor
    and the RMSNorm scales)."""
    if target in FP8_DTYPES and (t.ndim < 2 or key.endswith(("scale", "scale_factor"))):
        return t.dtype if t.dtype not in FP8_DTYPES else torch.bfloat16
    return target
