"""Models that are a folder or a file in one of ComfyUI's model folders: listing them for a combo, and
finding the one picked. Hugging Face / diffusers folders (a config.json inside, one or two levels deep) come
first, then the single .safetensors files ComfyUI lists itself."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import folder_paths

from .inputs import inside_loop, usable_files

ConfigTest = Callable[[dict], bool]


def _config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def model_folders(kind: str, accepts: ConfigTest = lambda config: True) -> list[str]:
    """Folders under models/<kind>/ (one or two deep) whose config.json ``accepts``, as names relative to it."""
    found = set()
    for base in folder_paths.get_folder_paths(kind):
        base = Path(base)
        if not base.is_dir():
            continue
        for config in [*base.glob("*/config.json"), *base.glob("*/*/config.json")]:
            name = config.parent.relative_to(base).as_posix()
            # No dangling or looping links (a loop would repeat every folder under ever longer names).
            if config.is_file() and not inside_loop(base, f"{name}/config.json") and accepts(_config(config)):
                found.add(name)
    return sorted(found)


def model_choices(kind: str, accepts: ConfigTest = lambda config: True) -> list[str]:
    """The folders first, then the single .safetensors files."""
    files = [name for name in usable_files(kind) if name.lower().endswith(".safetensors")]
    return model_folders(kind, accepts) + sorted(files)


def require_inside(kind: str, name: str, input_name: str) -> None:
    """Refuse names that leave models/<kind>/ (`../`, absolute paths): the loaders read only there."""
    normalised = os.path.normpath(name)
    if os.path.isabs(name) or normalised == os.pardir or normalised.startswith(os.pardir + os.sep):
        raise ValueError(f"{input_name} {name!r} points outside models/{kind}/; pick an entry from the list "
                         f"(a folder or file inside models/{kind}/)")


def resolve(kind: str, name: str, input_name: str) -> Path:
    """The folder or single file ``name`` under models/<kind>/."""
    require_inside(kind, name, input_name)
    for base in folder_paths.get_folder_paths(kind):
        candidate = Path(base) / name
        if candidate.is_dir():
            return candidate
    path = folder_paths.get_full_path(kind, name)
    if path is not None:
        return Path(path)
    raise FileNotFoundError(f"no folder or file {name!r} under models/{kind}/ (looked in "
                            f"{folder_paths.get_folder_paths(kind)})")


def model_files(path: Path) -> list[Path]:
    """The files whose change means the model must be reloaded."""
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
