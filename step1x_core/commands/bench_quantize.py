"""One DiT call on fixed random inputs, to compare a quantized DiT with the bf16 one (tests and benchmark)."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..sampling.latents import edit_ids
from ..dit.model import Step1XEditDiT
from ..dit.params import STEP1X_EDIT_PARAMS, DiTParams
from ..formats.dtypes import dtype_name
from ..versions import Version


def dit_inputs(params: DiTParams, seed: int = 0, latent: int = 8, text_tokens: int = 12,
               dtype: torch.dtype = torch.float32) -> dict:
    """Fixed random inputs for one DiT call of a model of ``params``: a [target | reference] latent of
    latent x latent, ``text_tokens`` random Qwen embeddings (and v1.2's quoted-character inputs)."""
    gen = torch.Generator().manual_seed(seed)
    width = params.connector.in_channels
    inputs = {"embeds": torch.randn(1, text_tokens, width, generator=gen).to(dtype),
              "mask": torch.ones(1, text_tokens, dtype=torch.long), "extra": {}}
    if params.version.has_text_token_mapping:
        inputs["extra"] = {"text_embeds": torch.randn(1, text_tokens, width, generator=gen).to(dtype) / 8,
                           "text_mask": (torch.arange(text_tokens) % 3 == 0).long().unsqueeze(0)}
    tokens = 2 * (latent // 2) ** 2
    inputs["img"] = torch.randn(1, tokens, params.in_channels, generator=gen).to(dtype)
    inputs["img_ids"], inputs["txt_ids"] = edit_ids(latent, latent, 1, params.version, text_tokens)
    inputs["t"] = torch.full((1,), 0.6, dtype=dtype)
    return inputs


def velocity(model: Step1XEditDiT, inputs: dict) -> Tensor:
    """One call of the whole model (its connector included) on ``dit_inputs``."""
    with torch.inference_mode():
        ctx = model.precompute(inputs["embeds"], inputs["mask"], **inputs["extra"])
        return model.forward_context(inputs["img"], inputs["img_ids"], inputs["txt_ids"], inputs["t"], ctx).float()


def wide_dit_params(depth: int = 1, single: int = 1, version: Version | str = Version.V1_1) -> DiTParams:
    """The released model's widths (hidden 3072, connector 4096 over Qwen's 3584) with fewer blocks."""
    return replace(STEP1X_EDIT_PARAMS, depth=depth, depth_single_blocks=single, version=Version.parse(version))


def parameter_count(params: DiTParams) -> dict[str, int]:
    """Parameters of a DiT by storage role: "matrix" (Linear weights in the blocks and connector), "kept" (the
    input/output layers `quantize` keeps in bf16), "vector" (biases, norms)."""
    from .core import kept_by_position

    with torch.device("meta"):
        model = Step1XEditDiT(params)
    counts = {"matrix": 0, "kept": 0, "vector": 0}
    for name, tensor in model.state_dict().items():
        role = "vector" if tensor.ndim < 2 else "kept" if kept_by_position(name) else "matrix"
        counts[role] += tensor.numel()
    return counts


def write_random_dit(path: str | Path, params: DiTParams, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random DiT of ``params`` as a release-style .safetensors file, written one tensor at a time (a file of
    several GB without holding it): Linear weights ~ U(+-1/sqrt(fan_in)) as PyTorch initialises them, norm scales
    1, biases small."""
    path = Path(path)
    with torch.device("meta"):
        model = Step1XEditDiT(params)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    header, offset = {}, 0
    size = torch.empty((), dtype=dtype).element_size()
    for name, shape in shapes.items():
        nbytes = size * int(torch.Size(shape).numel())
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", "step1x_version": str(params.version)}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            if name.endswith(".scale"):
                t = torch.ones(shape)
            elif name == "connector.scale_factor":
                t = torch.full(shape, -0.91)
            else:
                bound = 1 / shape[-1] ** 0.5 if len(shape) == 2 else 0.02
                t = (torch.rand(shape, generator=gen) * 2 - 1) * bound
            f.write(t.to(dtype).view(torch.uint8).numpy().tobytes())
            del t
    return path


# The package as this process knows it (a subprocess imports it by the same name).
_PACKAGE = __name__.rsplit(".commands.", 1)[0]
_PEAK_PROBE = """
import json, sys, time
from PACKAGE.quantize import quantize_dit
import gguf, numpy, tqdm  # everything the quantizer imports, before the baseline

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to what is resident now
    f.write("5")
before = status("VmRSS")
start = time.perf_counter()
quantize_dit(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"baseline_bytes": before, "peak_bytes": status("VmHWM"), "seconds": seconds}))
""".replace("PACKAGE", _PACKAGE)


def quantize_peak_memory(input_path: str | Path, fmt: str, output: str | Path) -> dict[str, float]:
    """Quantize in a fresh process and return its peak resident memory above what the imports took
    (``held_bytes``), the totals, and the seconds. Linux/macOS (``resource``)."""
    import os
    import subprocess
    import sys

    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _PEAK_PROBE, str(input_path), fmt, str(output)], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"quantizing {input_path} to {fmt} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["held_bytes"] = result["peak_bytes"] - result["baseline_bytes"]
    return result


def edit_image(models_dir: str | Path, dit: str | Path, image: str | Path, output: str | Path,
               steps: int = 2, size: int = 64) -> Tensor:
    """One edit through the command line (``step1x-edit``) with ``dit`` and the rest of ``models_dir``; returns the
    saved image as floats in [0, 1] [H, W, 3]."""
    import numpy as np
    from PIL import Image

    from ..commands.cli import main

    code = main(["--models-dir", str(models_dir), "--dit", str(dit), "--image", str(image), "--instruction",
                 "add a red hat", "--output", str(output), "--size-level", str(size), "--steps", str(steps),
                 "--seed", "0", "--quiet"])
    if code:
        raise RuntimeError(f"step1x-edit failed with {dit} (exit {code})")
    return torch.from_numpy(np.asarray(Image.open(output).convert("RGB"), dtype=np.float32) / 255)
