"""What the nodes accept: combo values checked in ``execute``, model lists without entries that cannot be opened.

ComfyUI before 0.3.6x does not check V3 combo values against their lists, and scripts call ``execute``
directly, so a value outside the list would end in a bare KeyError deep in a node; here it gets the list.
ComfyUI lists every name under a model folder, including links that lead nowhere (dangling, or a loop back
into the folder, which also repeats every file under ever longer names); those are left out of the lists.
"""

from __future__ import annotations

import os
from pathlib import Path

from comfy_api.latest import io

import folder_paths

from ..step1x_core.release_files import describe_missing

__all__ = ["check_combos", "inside_loop", "usable_files"]

SHOWN = 12  # choices named in a message


def _choices(options: list) -> str:
    shown = ", ".join(repr(o) for o in options[:SHOWN])
    return shown + (f", ... ({len(options)} in all)" if len(options) > SHOWN else "") if options else "none"


def check_combos(node: type[io.ComfyNode], values: dict, files: dict[str, str] | None = None) -> None:
    """Refuse a combo value outside its list, naming the input and the valid values. ``files`` maps inputs
    whose list is a models folder (input id -> folder name) to it: those raise FileNotFoundError and say why."""
    schema = node.define_schema()
    for item in schema.inputs:
        if not isinstance(item, io.Combo.Input) or item.id not in values:
            continue
        value, options = values[item.id], list(item.options or [])
        if value in options or (isinstance(value, str) and os.path.normpath(value) in options):
            continue
        where = f"{schema.display_name}: {item.id} {value!r}"
        folder = (files or {}).get(item.id)
        if folder is None:
            raise ValueError(f"{where} is not one of its choices: {_choices(options)}")
        inside = os.path.relpath(os.path.join("/", str(value)), "/")  # as ComfyUI confines names to the folder
        paths = [Path(base) / inside for base in folder_paths.get_folder_paths(folder)]
        if any(path.exists() for path in paths):
            continue  # there but unlisted (no config.json, say): the loader says what is wrong with it
        why = next((f" (it {describe_missing(p)})" for p in paths if os.path.lexists(p)), "")
        raise FileNotFoundError(f"{where} not found in models/{folder}/{why}; choose one of: {_choices(options)}")


def inside_loop(base: Path, name: str) -> bool:
    """Whether ``name`` reaches its file through a folder link that leads back into a folder already passed."""
    seen = {base.resolve()}
    current = base
    for part in Path(name).parts[:-1]:
        current = current / part
        real = current.resolve()
        if real in seen:
            return True
        seen.add(real)
    return False


def usable_files(folder: str) -> list[str]:
    """ComfyUI's file list of a models folder without links that lead nowhere or loop."""
    bases = [Path(p) for p in folder_paths.get_folder_paths(folder)]
    return [name for name in folder_paths.get_filename_list(folder) if _usable(bases, name)]


def _usable(bases: list[Path], name: str) -> bool:
    for base in bases:
        path = base / name
        if os.path.lexists(path):
            return path.is_file() and not inside_loop(base, name)
    return False
