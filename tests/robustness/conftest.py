"""Fixtures of the robustness suite (the tiny models and the ComfyUI fixture come from tests/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from step1x_core.release_files import find_in_models_dir
from step1x_core.pipeline import Step1XEditPipeline
from tests.robustness.helpers import PREFIX


@pytest.fixture(scope="session")
def pipe(tiny_models):
    """The standalone engine on the tiny models (float32, CPU)."""
    return Step1XEditPipeline.from_files(find_in_models_dir(tiny_models, "dit"), find_in_models_dir(tiny_models, "vae"),
                                         find_in_models_dir(tiny_models, "text_encoder"), device="cpu",
                                         dtype=torch.float32)


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
