"""A Step1X-Edit DiT read one tensor at a time, for quantising files larger than the memory at hand.

The input is recognised from its header alone by the DiT loader's own check (`recognise_dit`, on meta tensors),
so a file that is not a Step1X-Edit DiT gets the loaders' message. Tensor data is then read with plain file reads
(no memory map), one tensor at a time, and a diffusers-layout file is converted to the original layout tensor by
tensor with the loader's tables (renames, fused q/k/v, swapped final-layer halves).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from ..dit.checkpoint import CheckpointError, LoadedCheckpoint, recognise_dit, strip_prefix
from ..dit.diffusers_config import config_from_metadata, read_config_file
from ..formats.safetensors_file import read_header
from ..dit.diffusers_keys import FUSED, RENAMES, SWAPPED_HALVES, UNCHANGED, block_indices, expand_pattern

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str  # safetensors' name
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def _read_entries(path: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    read_header(path, CheckpointError)  # the loaders' checks and messages (pickles, LFS pointers, truncation...)
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    metadata = header.pop("__metadata__", None) or {}
    entries = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        entries[name] = _Entry(path, info["dtype"], tuple(info["shape"]), 8 + length + begin, 8 + length + end)
    return entries, metadata


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder; give a Step1X-Edit DiT .safetensors file or a "
                              "diffusers transformer/ folder")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        names = sorted(set(json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: the shard(s) {', '.join(missing)} listed in {indexes[0].name} are "
                                  "missing; finish or redo the download")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(f"{path}: expected one .safetensors file or a *.safetensors.index.json with its "
                              f"shards, found {', '.join(f.name for f in files) or 'none'}")
    return files


def _diffusers_recipes(names: set[str]) -> dict[str, tuple[str, list[str]]]:
    """original name -> (how, diffusers names): "same" (a rename), "cat" (fused along dim 0), "swap" (halves)."""
    counts = {"double_blocks": len(block_indices(names, "transformer_blocks")),
              "single_blocks": len(block_indices(names, "single_transformer_blocks"))}
    expand = functools.partial(expand_pattern, counts=counts)
    out: dict[str, tuple[str, list[str]]] = {n: ("same", [n]) for n in names if n.startswith(UNCHANGED)}
    suffixes = ("weight", "bias", "scale")
    for orig_pattern, diff_pattern in RENAMES.items():
        for orig, n in expand(orig_pattern):
            diff = diff_pattern.format(n=n)
            if diff in names:
                out[orig] = ("same", [diff])
            out.update({f"{orig}.{s}": ("same", [f"{diff}.{s}"]) for s in suffixes if f"{diff}.{s}" in names})
    for orig_pattern, pieces in FUSED.items():
        for orig, n in expand(orig_pattern):
            parts = [p.format(n=n) for p in pieces]
            for s in suffixes:
                if all(f"{p}.{s}" in names for p in parts):
                    out[f"{orig}.{s}"] = ("cat", [f"{p}.{s}" for p in parts])
    orig, diff = SWAPPED_HALVES
    out.update({f"{orig}.{s}": ("swap", [f"{diff}.{s}"]) for s in suffixes if f"{diff}.{s}" in names})
    return out


class DiTSource:
    """A Step1X-Edit DiT file or diffusers transformer folder, recognised, and readable tensor by tensor in the
    original layout (``names``, ``read``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.entries: dict[str, _Entry] = {}
        self.metadata: dict[str, str] = {}
        for file in _files(self.path):
            entries, metadata = _read_entries(file)
            self.entries.update(entries)
            self.metadata = self.metadata or metadata
        unknown = sorted({e.dtype for e in self.entries.values()} - set(SAFETENSORS_DTYPES))
        if unknown:
            raise CheckpointError(f"{self.path.name}: tensors stored as {', '.join(unknown)}, which are not float "
                                  "weights; quantize the released bf16 (or fp8) file instead")
        config = None
        if self.path.is_dir() and (self.path / "config.json").is_file():
            try:
                config = read_config_file(self.path / "config.json")
            except ValueError as err:
                raise CheckpointError(f"{self.path.name}: {err}") from err
        elif not self.path.is_dir():
            config = config_from_metadata(self.metadata)
        self.config = config
        # names as the DiT loader sees them (a wrapper prefix stripped) -> names in the file
        self._file_names = strip_prefix({name: name for name in self.entries})
        meta = {name: torch.empty(self.entries[file_name].shape, dtype=SAFETENSORS_DTYPES[
            self.entries[file_name].dtype], device="meta") for name, file_name in self._file_names.items()}
        self.checkpoint: LoadedCheckpoint = recognise_dit(meta, self.path.name, config=config)
        if self.checkpoint.layout == "diffusers":
            self._recipes = _diffusers_recipes(set(meta))
        else:
            self._recipes = {name: ("same", [name]) for name in meta}

    @property
    def names(self) -> list[str]:
        """The tensors in the original layout, in the loader's order."""
        return list(self.checkpoint.state_dict)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.checkpoint.state_dict[name].shape)

    @property
    def largest_tensor_bytes(self) -> int:
        return max(e.end - e.begin for e in self.entries.values())

    def _read_raw(self, name: str) -> Tensor:
        entry = self.entries[self._file_names[name]]
        buffer = bytearray(entry.end - entry.begin)
        with open(entry.file, "rb") as f:
            f.seek(entry.begin)
            if f.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{entry.file.name}: truncated at tensor {name}; download it again")
        if not buffer:
            return torch.empty(entry.shape, dtype=SAFETENSORS_DTYPES[entry.dtype])
        return torch.frombuffer(buffer, dtype=SAFETENSORS_DTYPES[entry.dtype]).reshape(entry.shape)

    def read(self, name: str) -> Tensor:
        """One original-layout tensor, in its stored dtype, read from disk now (nothing is kept)."""
        how, parts = self._recipes[name]
        if how == "cat":
            return torch.cat([self._read_raw(p) for p in parts], dim=0)
        tensor = self._read_raw(parts[0])
        if how == "swap":
            first, second = tensor.chunk(2, dim=0)
            return torch.cat([second, first], dim=0)
        return tensor

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        for name in self.names:
            yield name, self.read(name)
