"""Storage dtypes by safetensors' names ('BF16', 'F8_E4M3', ...): which ones hold weights, and what the others are."""

from __future__ import annotations

import torch

__all__ = ["FLOAT_STORAGE", "describe_dtype", "dtype_name", "readable"]

# What a weight may be stored as: floats, and fp8 (cast up one layer at a time).
FLOAT_STORAGE = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_ORDER = ["F32", "BF16", "F16", "F8_E4M3", "F8_E5M2", "F64"]

_TORCH_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL", torch.complex64: "C64"}
_TORCH_NAMES.update({getattr(torch, t): n for t, n in (
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e8m0fnu", "F8_E8M0"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("float4_e2m1fn_x2", "F4"),
    ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")) if hasattr(torch, t)})

_KINDS = (("BOOL", "boolean: a mask or a flag, not a weight"),
          (("I", "U"), "integer: quantised weights or indices, which this pack does not dequantise"),
          ("C", "complex numbers, not a weight"),
          (("F4", "F6", "F8_E8M0"), "a micro-scaling (MX / NVFP4) quantisation this pack cannot read"),
          (("F8_E4M3FNUZ", "F8_E5M2FNUZ"), "AMD's fp8 variant (fnuz), which this pack does not read"))


def dtype_name(dtype: torch.dtype | str) -> str:
    """safetensors' name of a torch dtype ('BF16'); safetensors' names pass through unchanged."""
    return dtype if isinstance(dtype, str) else _TORCH_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def readable(name: str) -> bool:
    """Whether this torch and safetensors can load a tensor stored as ``name`` at all."""
    return name in _TORCH_NAMES.values()


def describe_dtype(name: str) -> str:
    """What a non-weight storage dtype holds, for messages: 'integer: quantised weights or ...'."""
    if name in FLOAT_STORAGE:
        return "floating point"
    return next((text for prefix, text in _KINDS if name.startswith(prefix)), "a type this pack cannot read")


def accepted(names) -> str:
    """'F32/BF16/F16/F8_E4M3' for messages, in a stable order."""
    return "/".join(sorted(names, key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER)))
