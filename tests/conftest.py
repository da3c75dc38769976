"""Shared fixtures: tiny random models laid out like ComfyUI's models/ folder (built once per run)."""

from __future__ import annotations

import pytest

from step1x_core.testing.factory import make_tiny


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("models"))
