"""Shared pieces of the robustness suite: ComfyUI graphs with their own file names, memory readings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from step1x_core.testing.factory import TEXT_GAIN, TINY_QWEN_HIDDEN
from step1x_core.testing.tiny_dit import tiny_dit_params, tiny_dit_state_dict
from tests.golden import REPO_ROOT
from tests.comfyui.graphs import edit_graph, run_ok, saved_latent  # noqa: F401  (re-exported)

CAT = REPO_ROOT / "tests" / "data" / "cat.png"
PREFIX = "robust"  # every file this suite adds to the shared ComfyUI starts with it


def graph(image: str = "cat.png", prefix: str = PREFIX, size: int = 64, **kwargs) -> dict:
    """tests/comfyui/graphs.py's edit graph (3 steps unless given) on `image` from ComfyUI's input
    folder, at custom size `size`, saving under this suite's prefix."""
    g = edit_graph(prefix=f"{PREFIX}_{prefix}", **kwargs)
    g["1"]["inputs"]["image"] = image
    g["2"]["inputs"]["custom_size"] = size
    return g


def one_error_line(stderr: str) -> str:
    """The command line's error: exactly one line on stderr, starting with 'step1x-edit: error:'."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("step1x-edit: error:"), stderr
    return lines[0]


def tiny_dit_file_state(version: str = "v1.1") -> dict[str, torch.Tensor]:
    """The tensors of make_tiny's DiT of ``version`` as its file stores them (bf16), to break one on purpose."""
    params = tiny_dit_params(version, TINY_QWEN_HIDDEN)
    seed = 1 if version == "v1.1" else 0  # make_tiny's seeds
    return {k: v.to(torch.bfloat16) for k, v in tiny_dit_state_dict(params, seed, TEXT_GAIN).items()}


def run_error(comfyui, prompt: dict) -> str:
    """Run a graph that must fail in a node; return ComfyUI's error text (what the UI shows)."""
    result = comfyui.run(prompt)
    assert not result.success, "the graph ran although it should have failed"
    return result.error()


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A smooth test picture of any size (cheap to build, compresses well)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack(np.broadcast_arrays(x, y, (x + y) / 2), axis=-1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def save_input(comfyui, image: Image.Image, name: str, **save_kwargs) -> str:
    """Put an image into ComfyUI's input folder under this suite's prefix; returns its name."""
    name = f"{PREFIX}_{name}"
    image.save(comfyui.workdir / "input" / name, **save_kwargs)
    return name


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def rss_mb() -> float:
    """Resident memory of this process now."""
    return _status_kb("VmRSS") / 1024


def reset_peak() -> None:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_mb() -> float:
    return _status_kb("VmHWM") / 1024
