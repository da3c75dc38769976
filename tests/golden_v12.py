"""Where the v1.2 golden vectors live and how to read them (see the README beside them)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from tests.golden import golden_dir, golden_v12_dir

# The README's bounds: float32 reimplementations stay within these of the reference (relative L2 and
# max|a-b|/max|b|); the reference moves by about a tenth of them between its own runs.
FORWARD_TOLERANCE = 1e-5
RUN_TOLERANCE = 2e-5


def sets(suffix: str) -> list[Path]:
    """Every golden file of this kind, e.g. sets("_forward.safetensors"): the public tiny_* and held-back stems."""
    return sorted(golden_v12_dir().glob(f"*{suffix}"))


def stem(path: Path, suffix: str) -> str:
    return path.name[: -len(suffix)]


def read(path: Path) -> tuple[dict, dict]:
    """(tensors, the 'about' metadata) of a golden safetensors file."""
    with safe_open(str(path), "pt") as handle:
        about = json.loads(handle.metadata()["about"])
    return load_file(str(path)), about


def max_relative(actual, expected) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def qwen_folder(set_stem: str) -> Path:
    """The text encoder a golden set ran with: its ``<stem>_qwen_overlay`` names the weights it was built on
    (``weights_from``, a folder of the v1.0/v1.1 golden directory), which our loader reads directly."""

    overlay = golden_v12_dir() / f"{set_stem}_qwen_overlay"
    weights_from = json.loads((overlay / "about.json").read_text())["weights_from"]
    return golden_dir() / Path(weights_from).name


def model_path(about: dict, role: str) -> Path:
    return golden_v12_dir() / about["models"][role]
