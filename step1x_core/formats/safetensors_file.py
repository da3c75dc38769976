"""Opening a model file: only safetensors, memory-mapped; pickles refused; unreadable files explained.

Every loader (DiT, VAE, Qwen2.5-VL) goes through here, and raises its own subclass of
``ModelFileError`` so a caller can catch one type for "this file cannot be used".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

__all__ = ["ModelFileError", "PICKLE_SUFFIXES", "SafetensorsHeader", "describe_unreadable", "load_shards",
           "load_tensors", "read_header"]

# Formats that torch.load would unpickle: never opened.
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl"})


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file, what it holds and the fix."""


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors header says, without reading any tensor data."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors' names: "BF16", "F8_E4M3", ...
    metadata: dict[str, str]


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


def _checked_path(path: str | Path, error: type[ModelFileError]) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise error(f"{path}: file not found")
    if path.is_dir():
        raise error(f"{path}: is a folder; expected a single .safetensors file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise error(f"{path.name}: only .safetensors files are loaded; {path.suffix} files are Python pickles, "
                    "which can run code when loaded. Download the .safetensors release of the model.")
    return path


def _unreadable(path: Path, cause: BaseException, error: type[ModelFileError]) -> ModelFileError:
    return error(f"{path.name} cannot be read as safetensors ({cause}); {describe_unreadable(path)}")


def load_tensors(path: str | Path, error: type[ModelFileError] = ModelFileError,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, memory-mapped (no copy until a tensor is moved or cast)."""
    path = _checked_path(path, error)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as cause:
        raise _unreadable(path, cause, error) from cause


def load_shards(folder: str | Path, error: type[ModelFileError] = ModelFileError) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face / diffusers weights folder: the shards its ``*.safetensors.index.json``
    lists, or its one .safetensors file; memory-mapped like ``load_tensors``."""
    folder = Path(folder).expanduser()
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise error(f"{indexes[0]}: not a readable shard index ({err}); download the folder again") from err
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise error(f"{folder}: the shard(s) {', '.join(missing)} listed in {indexes[0].name} are missing; finish "
                        "or redo the download")
    else:
        files = sorted(folder.glob("*.safetensors"))
        if len(files) != 1:
            found = ", ".join(f.name for f in files) or "none"
            raise error(f"{folder}: expected one .safetensors file or a *.safetensors.index.json with its shards, "
                        f"found {found}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_tensors(path, error))
    return tensors


def read_header(path: str | Path, error: type[ModelFileError] = ModelFileError) -> SafetensorsHeader:
    """Names, shapes, dtypes and metadata of a safetensors file; reads no tensor data."""
    path = _checked_path(path, error)
    try:
        with safe_open(str(path), framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            return SafetensorsHeader(
                shapes={key: tuple(s.get_shape()) for key, s in slices.items()},
                dtypes={key: s.get_dtype() for key, s in slices.items()},
                metadata=dict(handle.metadata() or {}),
            )
    except (SafetensorError, OSError, ValueError) as cause:
        raise _unreadable(path, cause, error) from cause


def unreadable_files(folder: Path) -> list[str]:
    """'name: what it holds instead.' for each safetensors file of ``folder`` whose header cannot be read."""
    found = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            read_header(path)
        except ModelFileError:
            found.append(f"{path.name}: {describe_unreadable(path)}.")
    return found
