"""Shared fixtures: tiny random models laid out like ComfyUI's models/ folder (built once per run)."""

from __future__ import annotations

import pytest

from tests import cpu_torchvision

cpu_torchvision.apply()  # before anything imports transformers or ComfyUI

from step1x_core.testing.factory import make_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("models"))
