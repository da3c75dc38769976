"""Fixtures of the robustness suite (the tiny models and the ComfyUI fixture come from tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from step1x_core.release_files import find_in_models_dir
from step1x_core.pipeline import Step1XEditPipeline


@pytest.fixture(scope="session")
def pipe(tiny_models):
    """The standalone engine on the tiny models (float32, CPU)."""
    return Step1XEditPipeline.from_files(find_in_models_dir(tiny_models, "dit"), find_in_models_dir(tiny_models, "vae"),
                                         find_in_models_dir(tiny_models, "text_encoder"), device="cpu",
                                         dtype=torch.float32)
