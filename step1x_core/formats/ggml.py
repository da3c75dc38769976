"""GGML block formats in torch: the formats `step1x-edit-quantize` writes, dequantised on any device.

Each format stores a row in blocks of 32 values; a block holds float16 scale(s) and packed integers:
Q8_0 ``d, q[32]`` (x = d*q); Q4_0 ``d, nibbles[16]`` (x = d*(q-8)); Q4_1 ``d, m, nibbles[16]`` (x = d*q+m);
Q5_0 ``d, high bits (uint32), nibbles[16]`` (x = d*(q-16)); Q5_1 ``d, m, high bits, nibbles[16]`` (x = d*q+m).
Nibble j of a block is value j (low half) and value j+16 (high half). Quantising uses the gguf package's
reference code (``gguf.quants.quantize``); these functions are checked against its ``dequantize``.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 32
# Bytes per 32-value block.
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}
PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _f16(blocks: Tensor, start: int) -> Tensor:
    return blocks[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: Tensor) -> Tensor:
    """[n, 16] bytes -> [n, 32] values 0..15 (low nibbles are values 0-15, high nibbles 16-31)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.int32)


def _high_bits(qh: Tensor) -> Tensor:
    """[n, 4] bytes (a little-endian uint32) -> [n, 32] bits, bit j for value j."""
    bits = torch.arange(8, device=qh.device, dtype=torch.int32)
    return ((qh.to(torch.int32).unsqueeze(-1) >> bits) & 1).reshape(qh.shape[0], 32)


def dequantize_blocks(data: Tensor, qtype: str) -> Tensor:
    """Raw ``qtype`` blocks (uint8, [..., bytes]) -> float32 values [n_blocks, 32]."""
    blocks = data.reshape(-1, BLOCK_BYTES[qtype])
    if qtype == "Q8_0":
        return _f16(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    if qtype == "Q4_0":
        return _f16(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8).to(torch.float32)
    if qtype == "Q4_1":
        return _f16(blocks, 0) * _nibbles(blocks[:, 4:]).to(torch.float32) + _f16(blocks, 2)
    if qtype == "Q5_0":
        q = _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)
        return _f16(blocks, 0) * (q - 16).to(torch.float32)
    if qtype == "Q5_1":
        q = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)
        return _f16(blocks, 0) * q.to(torch.float32) + _f16(blocks, 2)
    raise ValueError(f"unknown GGML block format {qtype!r}; expected one of {sorted(BLOCK_BYTES)}")


def dequantize(data: Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """A GGUF tensor's data (as stored: raw bytes for block formats) as a ``shape`` tensor in ``dtype``."""
    if qtype in PLAIN:
        return data.contiguous().view(torch.uint8).view(PLAIN[qtype]).reshape(shape).to(dtype)
    return dequantize_blocks(data, qtype).reshape(shape).to(dtype)
