"""Reading a Step1X-Edit DiT from its files and building the model.

Everything is decided from keys and shapes (and a diffusers config.json for what no shape carries), never
from file names:
- layout: original (`double_blocks.*`) or diffusers (`transformer_blocks.*`, converted on load), one file or
  a diffusers `transformer/` folder of shards;
- version: v1.0 has `connector.scale_factor`, v1.2 `text_token_mapping`, v1.1 neither;
- sizes: hidden from `img_in`, head dim from the QK-norm width, block counts by counting;
- storage: fp8 (float8_e4m3fn) files keep fp8 weights and are cast one layer at a time; quantized files
  (GGUF, ComfyUI's mixed fp8: ``quantized``) stay quantized and are dequantised one layer per call.
Files are memory-mapped (safetensors), and the model is built on the meta device and takes the
mapped tensors as its parameters, so loading holds about one copy of the weights.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..formats.expected import checked_weight
from ..formats.safetensors_file import load_shards, load_tensors, read_header
from ..ops import FP8_DTYPES, manual_cast
from ..ops import fp8_matmul as fp8_matmul_ops
from ..versions import Version
from . import quantized
from .checkpoint import (CheckpointError, LoadedCheckpoint, SideTensor, detect_version, kept_dtype, recognise_dit,
                         unused_by)
from .diffusers_config import config_from_metadata, read_config_file
from .model import Step1XEditDiT

logger = logging.getLogger(__name__)


def peek_version(path: str | Path) -> Version:
    """The version of a DiT file or diffusers transformer folder, from its tensor names alone (no weight read)."""
    path = Path(path)
    if path.is_dir():
        index = sorted(path.glob("*.safetensors.index.json"))
        names = set(json.loads(index[0].read_text())["weight_map"]) if index else set().union(
            *(read_header(f, CheckpointError).shapes for f in path.glob("*.safetensors")))
    else:
        names = quantized.gguf_tensor_names(path) if quantized.is_gguf(path) else set(read_header(path, CheckpointError).shapes)
    return detect_version({name.split("diffusion_model.")[-1].removeprefix("transformer."): None for name in names})


def read_dit_checkpoint(path: str | Path, version: Version | str | None = None,
                        config: dict | None = None, side_tensor: SideTensor | None = None) -> LoadedCheckpoint:
    """Read and recognise a Step1X-Edit DiT: one .safetensors file (any layout, any storage dtype), or a
    diffusers ``transformer/`` folder (config.json and one or more shards). ``config`` overrides the
    config found beside or inside the weights. ``side_tensor``: see `recognise_dit`."""
    path = Path(path)
    version = Version.parse(version) if version is not None else None  # a typo is named before reading
    if path.is_file() and quantized.is_gguf(path):
        return quantized.read_gguf_checkpoint(path, version, config)
    metadata: dict[str, str] = {}
    if path.is_dir():
        tensors = load_shards(path, CheckpointError)
        config_path = path / "config.json"
        if config is None and config_path.is_file():
            try:
                config = read_config_file(config_path)
            except ValueError as err:
                raise CheckpointError(f"{path.name}: {err}") from err
    else:
        tensors = load_tensors(path, CheckpointError)
        metadata = dict(read_header(path, CheckpointError).metadata or {})
        if config is None:
            config = config_from_metadata(metadata)
    engine_fp8 = side_tensor is None and quantized.QUANT_METADATA in metadata  # the engine reads the scales itself
    ckpt = recognise_dit(tensors, path.name, version, config, quantized.is_fp8_scale if engine_fp8 else side_tensor)
    ckpt.metadata = metadata
    return quantized.take_fp8_layers(ckpt) if engine_fp8 else ckpt


def build_dit(ckpt: LoadedCheckpoint, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
              attn_fn=None, fp8_matmul: bool = False) -> Step1XEditDiT:
    """Instantiate the DiT and give it the checkpoint's tensors.

    dtype None keeps the stored dtype. fp8 storage (or an fp8 `dtype`) keeps fp8 weights and uses
    per-layer casting; run such a model with inputs in the compute dtype (bf16 or fp32).
    `fp8_matmul` multiplies float8_e4m3fn Linear weights in fp8 (torch._scaled_mm) instead: faster on
    GPUs with fp8 tensor cores, lossy (activations are quantised too), off by default.
    """
    if ckpt.quantized:
        if fp8_matmul:
            raise ValueError(f"{ckpt.file_name} is already quantized; fp8 matmul takes a bf16 file loaded as fp8")
        return quantized.build_quantized_dit(ckpt, dtype, device, attn_fn)
    target = dtype or ckpt.storage_dtype
    fp8 = target in FP8_DTYPES
    if fp8_matmul and target != torch.float8_e4m3fn:
        raise ValueError(f"fp8 matmul needs float8_e4m3fn weights, but the DiT runs with {target} weights: "
                         "choose the fp8 weight dtype (--weight-dtype float8_e4m3fn) or an fp8 checkpoint")
    operations = fp8_matmul_ops if fp8_matmul else manual_cast if fp8 else nn
    with torch.device("meta"):
        model = Step1XEditDiT(ckpt.params, attn_fn=attn_fn, operations=operations)
    sd = {k: checked_weight(v, k, ckpt.file_name, kept_dtype(k, v, target), device, CheckpointError)
          for k, v in ckpt.state_dict.items() if not unused_by(ckpt.params.version, k)}
    model.load_state_dict(sd, strict=True, assign=True)  # the names and shapes were checked on reading
    return model.eval().requires_grad_(False)


def load_dit(path: str | Path | LoadedCheckpoint, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             version: Version | str | None = None, attn_fn=None, fp8_matmul: bool = False) -> Step1XEditDiT:
    """Load a Step1X-Edit DiT file or diffusers transformer folder (original or diffusers layout, v1.0/v1.1/v1.2,
    bf16/fp32/fp8), or build one from a checkpoint already read (and checked) with ``read_dit_checkpoint``."""
    ckpt = path if isinstance(path, LoadedCheckpoint) else read_dit_checkpoint(path, version)
    model = build_dit(ckpt, dtype=dtype, device=device, attn_fn=attn_fn, fp8_matmul=fp8_matmul)
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in ckpt.state_dict.values())
    p = ckpt.params
    logger.info("Step1X-Edit DiT %s: %s layout, %s, hidden %d, %d+%d blocks, stored %s, running as %s",
                ckpt.file_name, ckpt.layout, p.version, p.hidden_size, p.depth, p.depth_single_blocks,
                dict(dtypes), str(dtype or ckpt.storage_dtype).replace("torch.", ""))
    return model
