"""Quantized DiT files in the engine (command line, Python, batch): GGUF and ComfyUI's mixed-precision fp8.

A quantized Linear keeps its weight as stored (GGML blocks, or float8_e4m3fn and its scale) and dequantises it
in ``forward``, one layer at a time, to the input's dtype and device; nothing else of the model changes. The
file is recognised by the DiT loader's own check (names, shapes, version), so a quantized file detects exactly
as the file it was made from; the version its maker recorded must agree.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats import ggml
from .checkpoint import CheckpointError, LoadedCheckpoint, recognise_dit, unused_by
from .model import Step1XEditDiT
from ..formats.expected import checked_weight
from ..ops import manual_cast
from ..versions import Version

# What the quantizer records in its files (``step1x_core.quantize``): the source's version, layout and config.
META_VERSION, META_LAYOUT, META_SOURCE = "step1x.version", "step1x.source_layout", "step1x.source"
META_FORMAT, META_KEPT, META_CONFIG = "step1x.quantization", "step1x.kept_bf16", "step1x.config"
QUANT_METADATA = "_quantization_metadata"  # ComfyUI's mixed-precision files name their quantized layers here
FP8 = "F8_E4M3"


@dataclass
class QuantWeight:
    """One Linear weight as stored: ``data`` raw GGML blocks (uint8) or float8_e4m3fn values with ``scale``."""

    data: Tensor
    kind: str  # "Q8_0", "Q4_0", ... (GGML blocks) or FP8
    shape: tuple[int, ...]
    scale: Tensor | None = None

    def dequantize(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
        data = self.data if device is None else self.data.to(device, non_blocking=True)
        if self.kind == FP8:
            return (data.to(torch.float32) * self.scale.to(data.device, torch.float32)).to(dtype)
        return ggml.dequantize(data, self.kind, self.shape, dtype)


class QuantizedLinear(nn.Module):
    """``nn.Linear`` over a stored quantized weight, dequantised at each call."""

    def __init__(self, weight: QuantWeight, bias: bool, dtype=None, device=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.kind, self.shape = weight.kind, weight.shape
        self.register_buffer("qdata", weight.data, persistent=False)
        self.register_buffer("qscale", weight.scale, persistent=False)
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device)) if bias else None

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return QuantWeight(self.qdata, self.kind, self.shape, self.qscale).dequantize(dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.kind}"


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _gguf_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path.name}: not a readable GGUF file ({err}); download or quantize it again") from err


def gguf_tensor_names(path: str | Path) -> set[str]:
    return {tensor.name for tensor in _gguf_reader(Path(path)).tensors}


def _check_recorded_version(ckpt: LoadedCheckpoint, recorded: str | None, name: str) -> None:
    if recorded and Version.parse(recorded) != ckpt.params.version:
        raise CheckpointError(f"{name}: its tensors are a {ckpt.params.version} DiT, but the file says it was made "
                              f"from a {recorded} one; the file is damaged or was edited: quantize the release "
                              "file again with step1x-edit-quantize")


def read_gguf_checkpoint(path: str | Path, version: Version | str | None = None,
                         config: dict | None = None) -> LoadedCheckpoint:
    """A GGUF Step1X-Edit DiT (as `step1x-edit-quantize` or ComfyUI-GGUF's tools write them), recognised by its
    tensors; block-quantized matrices stay quantized (``ckpt.quantized``), everything else is read as float."""
    path = Path(path)
    reader = _gguf_reader(path)

    def field(key: str) -> str | None:
        found = reader.get_field(key)
        return None if found is None else str(bytes(found.parts[found.data[-1]]), encoding="utf-8")

    sd: dict[str, Tensor] = {}
    quantized: dict[str, QuantWeight] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        shape = tuple(int(v) for v in reversed(tensor.shape))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(tensor.data)
        if kind in ggml.PLAIN:  # vectors, and the matrices kept wide: plain tensors
            sd[tensor.name] = ggml.dequantize(data, kind, shape, ggml.PLAIN[kind])
        elif kind in ggml.BLOCK_BYTES:
            quantized[tensor.name] = QuantWeight(data, kind, shape)
            sd[tensor.name] = torch.empty(shape, dtype=torch.bfloat16, device="meta")
        else:
            raise CheckpointError(f"{path.name}: tensor {tensor.name} is stored as {kind}, which the engine does not "
                                  f"dequantise (it reads {', '.join(sorted(ggml.BLOCK_BYTES))}, F32, F16, BF16); "
                                  "make the file with step1x-edit-quantize, or load it in ComfyUI with ComfyUI-GGUF")
    if config is None and field(META_CONFIG):
        config = json.loads(field(META_CONFIG))
    ckpt = recognise_dit(sd, path.name, version, config)
    ckpt.quantized = {_unprefixed(name, ckpt): q for name, q in quantized.items()}
    ckpt.metadata = {key: field(key) or "" for key in (META_VERSION, "general.architecture")}
    ckpt.storage_dtype = torch.bfloat16
    _check_recorded_version(ckpt, field(META_VERSION) if version is None else None, path.name)
    return ckpt


def _unprefixed(name: str, ckpt: LoadedCheckpoint) -> str:
    stripped = name.removeprefix("transformer.").removeprefix("model.")
    for candidate in (name, name.split("diffusion_model.")[-1], stripped):
        if candidate in ckpt.state_dict:
            return candidate
    raise CheckpointError(f"{ckpt.file_name}: tensor {name} is not part of the model")


def is_fp8_scale(name: str) -> bool:
    return name.endswith((".weight_scale", ".input_scale"))


def take_fp8_layers(ckpt: LoadedCheckpoint) -> LoadedCheckpoint:
    """A mixed-precision fp8 file read with its scales as side tensors -> its fp8 layers as ``ckpt.quantized``."""
    layers = json.loads(ckpt.metadata.get(QUANT_METADATA, "{}")).get("layers", {})
    for layer, spec in layers.items():
        fmt = spec.get("format") if isinstance(spec, dict) else spec
        if fmt != "float8_e4m3fn":
            raise CheckpointError(f"{ckpt.file_name}: layer {layer} is quantized as {fmt!r}; the engine reads "
                                  "float8_e4m3fn layers (ComfyUI's mixed-precision fp8)")
        weight, scale = ckpt.state_dict.get(f"{layer}.weight"), ckpt.side_tensors.get(f"{layer}.weight_scale")
        if weight is None or scale is None:
            raise CheckpointError(f"{ckpt.file_name}: layer {layer} is listed as quantized but has no weight or "
                                  "weight_scale; quantize the release file again")
        ckpt.quantized[f"{layer}.weight"] = QuantWeight(weight, FP8, tuple(weight.shape), scale.float())
        ckpt.state_dict[f"{layer}.weight"] = torch.empty(weight.shape, dtype=torch.bfloat16, device="meta")
    ckpt.storage_dtype = torch.bfloat16
    _check_recorded_version(ckpt, ckpt.metadata.get(META_VERSION), ckpt.file_name)
    return ckpt


def build_quantized_dit(ckpt: LoadedCheckpoint, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", attn_fn=None) -> Step1XEditDiT:
    """The DiT with ``ckpt.quantized`` weights in QuantizedLinear layers (dequantised per call) and every other
    tensor in ``dtype`` (default bf16) on ``device``."""
    from ..ops import FP8_DTYPES

    if dtype in FP8_DTYPES:
        raise ValueError(f"{ckpt.file_name} is already quantized; load it without an fp8 weight dtype")
    dtype = dtype or torch.bfloat16
    with torch.device("meta"):
        model = Step1XEditDiT(ckpt.params, attn_fn=attn_fn, operations=manual_cast)
    for name, weight in ckpt.quantized.items():
        if unused_by(ckpt.params.version, name):
            continue
        layer = name.removesuffix(".weight")
        parent_name, _, child = layer.rpartition(".")
        parent = model.get_submodule(parent_name)
        original = getattr(parent, child)
        data = weight.data.to(device)
        scale = None if weight.scale is None else weight.scale.to(device)
        with torch.device("meta"):
            setattr(parent, child, QuantizedLinear(QuantWeight(data, weight.kind, weight.shape, scale),
                                                   original.bias is not None))
    sd = {k: checked_weight(v, k, ckpt.file_name, dtype, device, CheckpointError)
          for k, v in ckpt.state_dict.items() if k not in ckpt.quantized and not unused_by(ckpt.params.version, k)}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)
