"""What a test does when a tool it needs (ComfyUI, Chromium, npm packages) is missing.

On a developer's machine it skips, saying why. In CI (`.ci/run` sets STEP1X_REQUIRE_COMFYUI=1 after
installing everything) it fails instead: a CI run must never pass with its ComfyUI tests skipped.
"""

from __future__ import annotations

import os

import pytest

REQUIRED = os.environ.get("STEP1X_REQUIRE_COMFYUI") == "1"


def skip_or_fail(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason}; CI requires it (STEP1X_REQUIRE_COMFYUI=1)", pytrace=False)
    pytest.skip(reason)
