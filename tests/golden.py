"""Where the golden vectors of the official implementation live (see the repo README)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    return Path(os.environ.get("STEP1X_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))


def golden_v12_dir() -> Path:
    """Golden vectors of the v1.2 reference (the diffusers fork); same default place, beside golden/."""
    return Path(os.environ.get("STEP1X_GOLDEN_V12_DIR", REPO_ROOT.parent / "shared" / "golden_v12"))
