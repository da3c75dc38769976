"""`quantize_dit`: a Step1X-Edit DiT (any version, layout, shards) to ComfyUI's mixed fp8 file or to GGUF.

Streaming: tensors are read, quantised and written one at a time (and large ones in row chunks), so the peak
memory is a small multiple of the largest tensor, never the model. The output appears only when complete
(written beside it under a ``.partial`` name, then renamed).

Which layers stay in bf16 (both formats): the ones outside the residual blocks that every token passes through
once, ``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``final_layer``, v1.2's ``text_token_mapping``, and the
connector's pooled projection ``connector.global_proj_out`` (together 0.5% of the parameters at full size):
their error reaches the output directly instead of being averaged over 57 blocks. Measured on the tiny v1.1 DiT
(one DiT call against bf16, benchmarks/quantize.py): keeping ``global_proj_out`` (whose output drives every
block's modulation) takes fp8's error from 0.090 to 0.059 and Q4_0's from 0.20 to 0.12; keeping the whole
connector gains nothing more. For fp8 (one scale per tensor), a block weight is also kept when its measured
quantisation error (``|W - dq(W)| / |W|``) is more than ``OUTLIER_FACTOR`` times the median of the file's
weights: a few large values then set the scale and squash the rest. The kept layers (with their measured fp8
error) are listed in the output's metadata.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ..dit.checkpoint import CheckpointError
from ..dit.quantized import META_CONFIG, META_FORMAT, META_KEPT, META_LAYOUT, META_SOURCE, META_VERSION
from ..ops import E4M3_MAX
from .source import DiTSource

logger = logging.getLogger(__name__)

FORMATS = ("fp8", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
GGML_BLOCK = 32
# Input/output layers kept in bf16 (see the module docstring).
KEPT_PREFIXES = ("img_in.", "txt_in.", "time_in.", "vector_in.", "final_layer.", "text_token_mapping.",
                 "connector.global_proj_out.")
OUTLIER_FACTOR = 3.0
CHUNK_ELEMENTS = 1 << 24  # rows are processed in chunks of about this many values (64 MiB as float32)
# Metadata keys (safetensors metadata and GGUF key-value pairs) that record what the file was made from.


class QuantizeError(CheckpointError):
    """A quantization that cannot be done as asked; the message says why and what to do."""


@dataclass
class QuantizeReport:
    output: Path
    format: str
    version: str
    source_layout: str
    types: dict[str, int] = field(default_factory=dict)  # storage type -> tensor count
    kept_bf16: dict[str, float | None] = field(default_factory=dict)  # layer -> its measured fp8 error
    bytes_written: int = 0
    seconds: float = 0.0


def _row_chunks(t: Tensor) -> Iterator[Tensor]:
    """A 2-D view of ``t`` (rows = all but the last dim) in chunks of rows."""
    rows = t.reshape(-1, t.shape[-1]) if t.ndim > 1 else t.reshape(1, -1)
    step = max(1, CHUNK_ELEMENTS // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        yield rows[start:start + step]


def is_weight_matrix(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(".weight") and len(shape) == 2


def kept_by_position(name: str) -> bool:
    return name.startswith(KEPT_PREFIXES)


def fp8_scale(t: Tensor) -> Tensor:
    amax = max((chunk.float().abs().amax() for chunk in _row_chunks(t)), default=torch.tensor(0.0))
    return torch.clamp(amax / E4M3_MAX, min=torch.finfo(torch.float32).tiny).reshape(())


def fp8_quantize(t: Tensor, scale: Tensor) -> Tensor:
    out = torch.empty(t.shape, dtype=torch.float8_e4m3fn)
    flat_out = out.reshape(-1, t.shape[-1])
    row = 0
    for chunk in _row_chunks(t):
        flat_out[row:row + chunk.shape[0]] = (chunk.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        row += chunk.shape[0]
    return out


def fp8_error(t: Tensor) -> float:
    """|W - dq(q(W))| / |W| with one per-tensor scale, as ComfyUI's float8_e4m3fn layout stores it."""
    scale = fp8_scale(t)
    num = den = 0.0
    for chunk in _row_chunks(t):
        chunk = chunk.float()
        dq = (chunk / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
        num += float((chunk - dq).square().sum())
        den += float(chunk.square().sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def ggml_type(name: str, shape: tuple[int, ...], fmt: str) -> str:
    """The GGUF storage type of a tensor: the format's blocks for block weights whose rows are whole blocks;
    F32 for vectors and tiny tensors (as ComfyUI-GGUF's converter does); BF16 for kept or unblockable matrices."""
    if len(shape) < 2 or int(np.prod(shape)) <= 1024:
        return "F32"
    if kept_by_position(name) or shape[-1] % GGML_BLOCK:
        return "BF16"
    return fmt.upper()


def _atomic_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _progress(total: int, label: str, enabled: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=not enabled, dynamic_ncols=True)


def _source_metadata(source: DiTSource, fmt: str) -> dict[str, str]:
    meta = {META_VERSION: str(source.checkpoint.params.version), META_LAYOUT: source.checkpoint.layout,
            META_SOURCE: source.path.name, META_FORMAT: fmt}
    if source.config is not None:
        meta[META_CONFIG] = json.dumps(source.config)
    return meta


# ---- ComfyUI's mixed-precision fp8 safetensors -------------------------------------------------------------
def _plan_fp8(source: DiTSource, progress: bool) -> dict[str, float]:
    """Pass 1: every block weight's fp8 error; returns the kept layers (name -> error) by the rule above."""
    errors: dict[str, float] = {}
    kept: dict[str, float] = {}
    names = [n for n in source.names if is_weight_matrix(n, source.shape(n))]
    total = sum(int(np.prod(source.shape(n))) for n in names)
    with _progress(total, "measuring fp8 error", progress) as bar:
        for name in names:
            error = fp8_error(source.read(name))
            (kept if kept_by_position(name) else errors)[name] = error
            bar.update(int(np.prod(source.shape(name))))
    if errors:
        median = statistics.median(errors.values())
        kept.update({name: e for name, e in errors.items() if e > OUTLIER_FACTOR * median})
    return kept


def _write_fp8(source: DiTSource, partial: Path, report: QuantizeReport, progress: bool) -> None:
    kept = _plan_fp8(source, progress)
    report.kept_bf16 = {name.removesuffix(".weight"): error for name, error in kept.items()}
    quantized = [n for n in source.names if is_weight_matrix(n, source.shape(n)) and n not in kept]
    layout: list[tuple[str, str, tuple[int, ...], int]] = []  # name, dtype, shape, bytes
    for name in source.names:
        shape = source.shape(name)
        count = int(np.prod(shape))
        if name in quantized:
            layout.append((name, "F8_E4M3", shape, count))
            layout.append((name.removesuffix("weight") + "weight_scale", "F32", (), 4))
        else:
            layout.append((name, "BF16", shape, 2 * count))
    header: dict = {}
    offset = 0
    for name, dtype, shape, nbytes in layout:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    layers = {name.removesuffix(".weight"): {"format": "float8_e4m3fn"} for name in quantized}
    metadata = {"format": "pt", "_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers}),
                **_source_metadata(source, "fp8"), META_KEPT: json.dumps(report.kept_bf16)}
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(partial, "wb") as f, _progress(offset, f"writing {partial.name.removesuffix('.partial')}",
                                             progress) as bar:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in source.names:
            tensor = source.read(name)
            if name in quantized:
                scale = fp8_scale(tensor)
                for chunk in _row_chunks(tensor):  # row-major, as the header's shape says
                    f.write(fp8_quantize(chunk, scale).view(torch.uint8).numpy().data)
                f.write(scale.float().numpy().tobytes())
                report.types["F8_E4M3"] = report.types.get("F8_E4M3", 0) + 1
                bar.update(tensor.numel() + 4)
            else:
                f.write(tensor.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().data)
                report.types["BF16"] = report.types.get("BF16", 0) + 1
                bar.update(2 * tensor.numel())
            del tensor
        f.flush()
        os.fsync(f.fileno())


# ---- GGUF (ComfyUI-GGUF) -----------------------------------------------------------------------------------
def _ggml_bytes(shape: tuple[int, ...], qtype: str) -> tuple[tuple[int, ...], int]:
    import gguf

    byte_shape = gguf.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType[qtype])
    return tuple(byte_shape), int(np.prod(byte_shape))


def ggml_quantize(t: Tensor, qtype: str) -> np.ndarray:
    """``t`` as GGUF data of ``qtype`` (uint8 bytes for block and BF16 types), quantised in row chunks."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return t.float().numpy().reshape(t.shape).copy()
    byte_shape, _ = _ggml_bytes(tuple(t.shape), qtype)
    out = np.empty(byte_shape, dtype=np.uint8)
    flat = out.reshape(-1, byte_shape[-1])
    row = 0
    for chunk in _row_chunks(t):
        flat[row:row + chunk.shape[0]] = gguf.quants.quantize(chunk.float().numpy(), kind)
        row += chunk.shape[0]
    return out


def _write_gguf(source: DiTSource, partial: Path, fmt: str, report: QuantizeReport, progress: bool) -> None:
    import gguf

    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{fmt.upper()}")
    writer = gguf.GGUFWriter(path=None, arch="flux")  # ComfyUI-GGUF accepts only its listed architectures
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(file_type)
    for key, value in _source_metadata(source, fmt).items():
        writer.add_string(key, value)
    plan = {name: ggml_type(name, source.shape(name), fmt) for name in source.names}
    report.kept_bf16 = {name.removesuffix(".weight"): None for name, qtype in plan.items()
                        if qtype == "BF16" and name.endswith(".weight")}
    writer.add_string(META_KEPT, json.dumps(sorted(report.kept_bf16)))
    total = 0
    for name, qtype in plan.items():
        shape = source.shape(name)
        if qtype == "F32":
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
            total += 4 * int(np.prod(shape))
        else:
            byte_shape, nbytes = _ggml_bytes(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[qtype])
            total += nbytes
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with _progress(total, f"writing {partial.name.removesuffix('.partial')}", progress) as bar:
            for name, qtype in plan.items():
                data = ggml_quantize(source.read(name), qtype)
                writer.write_tensor_data(data)
                report.types[qtype] = report.types.get(qtype, 0) + 1
                bar.update(data.nbytes)
                del data
        for fout in writer.fout or []:
            fout.flush()
            os.fsync(fout.fileno())
    finally:
        writer.close()


def quantize_dit(input_path: str | Path, fmt: str, output: str | Path, progress: bool = True,
                 overwrite: bool = False) -> QuantizeReport:
    """Quantize a Step1X-Edit DiT (v1.0/v1.1/v1.2; original or diffusers layout; one file or a folder of
    shards) to ``fmt`` (one of ``FORMATS``): "fp8" writes ComfyUI's mixed-precision .safetensors, the others GGUF.

    Raises CheckpointError (the loaders' message) for a file that is not a Step1X-Edit DiT, QuantizeError for a
    request that cannot be done (format, output name)."""
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise QuantizeError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    output = Path(output).expanduser()
    wanted = ".safetensors" if fmt == "fp8" else ".gguf"
    if output.suffix.lower() != wanted:
        raise QuantizeError(f"{output.name}: a {fmt} file is written as {wanted}; name the output "
                            f"{output.stem}{wanted}")
    if output.exists() and not overwrite:
        raise QuantizeError(f"{output} exists; choose another name or pass --overwrite")
    if fmt != "fp8":
        try:
            import gguf  # noqa: F401
        except ImportError as err:
            raise QuantizeError("GGUF output needs the gguf package: pip install gguf") from err
    start = time.perf_counter()
    source = DiTSource(input_path)
    if output.resolve() in {e.file.resolve() for e in source.entries.values()}:
        raise QuantizeError(f"{output} is the input; choose another output name")
    report = QuantizeReport(output, fmt, str(source.checkpoint.params.version), source.checkpoint.layout)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = _atomic_path(output)
    try:
        if fmt == "fp8":
            _write_fp8(source, partial, report, progress)
        else:
            _write_gguf(source, partial, fmt, report, progress)
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    report.bytes_written = output.stat().st_size
    report.seconds = time.perf_counter() - start
    logger.info("%s: Step1X-Edit %s (%s layout) as %s, %s, %.1f MB, kept in bf16: %s", output.name, report.version,
                report.source_layout, fmt, report.types, report.bytes_written / 1e6, sorted(report.kept_bf16) or "none")
    return report

