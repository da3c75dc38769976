"""Shared fixtures: tiny random models laid out like ComfyUI's models/ folder (built once per run)."""

from __future__ import annotations

import pytest

from tests import cpu_torchvision

cpu_torchvision.apply()  # before anything imports transformers or ComfyUI

from step1x_core.testing.factory import make_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("models"))


def pytest_report_header(config):
    from tests.comfyui_harness import find_comfyui

    root = find_comfyui()
    if root is None:
        return ("ComfyUI integration tests: SKIPPED - no ComfyUI checkout at $COMFYUI_PATH or ~/comfy/ComfyUI "
                "(see README, Development)")
    return f"ComfyUI integration tests: using the checkout at {root}"
