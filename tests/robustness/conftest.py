"""Fixtures of the robustness suite (the tiny models, the tiny pipeline `pipe` and the ComfyUI fixture come from
tests/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.robustness.helpers import PREFIX


@pytest.fixture
def model_files(comfyui):
    """Write files (or links, or folders) into the shared ComfyUI models/ folder under this suite's prefix;
    removed afterwards."""
    written: list[Path] = []

    def add(folder: str, name: str) -> Path:
        path = comfyui.models / folder / f"{PREFIX}-{name}"
        written.append(path)
        return path

    yield add
    for path in written:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    comfyui.invalidate_file_lists()
