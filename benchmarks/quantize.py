"""Quantized Step1X-Edit DiTs against bf16: file size, peak RAM, time per DiT call, and error.

    python benchmarks/quantize.py --workdir DIR [--depth 1 --single 1] [--calls 3] [--skip-wide]

For a random DiT with the released widths and fewer blocks (default one of each kind, 2.1 GB in bf16) and the
tiny v1.1 model of the test factory, each format of `step1x-edit-quantize` and the fp8 cast of ``weight_dtype``
(the baseline to beat):
- file size; for the full model, sizes computed from its parameter counts (which tensors each format keeps);
- peak RAM of loading in the engine, and of loading plus one DiT call, each in a fresh process over its
  baseline after imports (/proc/self/clear_refs; Linux);
- time per DiT call (median of --calls, the formats interleaved), all models in one process, float32 compute
  on the CPU;
- relative error of one DiT call against the bf16 model (the whole model: connector and DiT) and, on the tiny
  models, of a whole edit through `step1x-edit` (2 steps, 64 px) against the bf16 edit.
Prints a Markdown table (the README's Low VRAM section quotes it) and writes DIR/quantize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from step1x_core.dit.loading import load_dit  # noqa: E402
from step1x_core.dit.params import STEP1X_EDIT_PARAMS  # noqa: E402
from step1x_core.quantize import FORMATS, quantize_dit  # noqa: E402
from step1x_core.commands.bench_measure import relative_error  # noqa: E402
from step1x_core.commands.bench_quantize import (dit_inputs, parameter_count, velocity,  # noqa: E402
                                          wide_dit_params, write_random_dit)

GGML_BLOCK_BYTES = {"q8_0": 34, "q5_1": 24, "q5_0": 22, "q4_1": 20, "q4_0": 18}
FP8_CAST = "fp8 cast"

_LOAD_PROBE = """
import json, sys, torch
from step1x_core.dit.loading import load_dit
from step1x_core.commands.bench_quantize import dit_inputs, velocity
import gguf

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

dtype = torch.float8_e4m3fn if sys.argv[2] == "cast" else torch.float32
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
model = load_dit(sys.argv[1], dtype=dtype)
loaded = status("VmHWM") - before
velocity(model, dit_inputs(model.params, latent=16))
print(json.dumps({"load": loaded, "load_and_call": status("VmHWM") - before}))
"""


def full_size_bytes(fmt: str) -> int:
    """The released DiT (v1.1: 12.4 B parameters) in each format, from its parameter counts."""
    counts = parameter_count(STEP1X_EDIT_PARAMS.with_version("v1.1"))
    matrix, kept, vector = counts["matrix"], counts["kept"], counts["vector"]
    if fmt == "bf16":
        return 2 * (matrix + kept + vector)
    if fmt in ("fp8", FP8_CAST):  # the cast keeps vectors (biases, norms) wide; mixed fp8 also the kept layers
        return matrix + (kept if fmt == FP8_CAST else 2 * kept) + 2 * vector
    return matrix // 32 * GGML_BLOCK_BYTES[fmt] + 2 * kept + 4 * vector


def load_memory(path: Path, fmt: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(path), fmt], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(source: Path, workdir: Path, label: str, calls: int, latent: int) -> list[dict]:
    rows = []
    files = {"bf16": source, FP8_CAST: source}
    for fmt in FORMATS:
        out = workdir / f"{label}-{fmt}{'.safetensors' if fmt == 'fp8' else '.gguf'}"
        if not out.exists():
            start = time.perf_counter()
            quantize_dit(source, fmt, out, progress=False)
            print(f"{label}: quantized to {fmt} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        files[fmt] = out
    reference = load_dit(source, dtype=torch.float32)
    inputs = dit_inputs(reference.params, latent=latent)
    expected = velocity(reference, inputs)
    models = {fmt: reference if fmt == "bf16" else load_dit(path, dtype=torch.float8_e4m3fn if fmt == FP8_CAST
                                                           else torch.float32) for fmt, path in files.items()}
    times: dict[str, list[float]] = {fmt: [] for fmt in files}
    outputs = {fmt: velocity(model, inputs) for fmt, model in models.items()}  # also a warm-up call
    for _ in range(calls):  # interleaved, so a busy machine slows every format alike
        for fmt, model in models.items():
            start = time.perf_counter()
            velocity(model, inputs)
            times[fmt].append(time.perf_counter() - start)
    del models
    for fmt, path in files.items():
        memory = load_memory(path, "cast" if fmt == FP8_CAST else fmt)
        rows.append({"model": label, "format": fmt, "file_bytes": path.stat().st_size,
                     "call_error": relative_error(outputs[fmt], expected),
                     "call_seconds": statistics.median(times[fmt]),
                     "load_bytes": memory["load"], "load_and_call_bytes": memory["load_and_call"]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def edit_errors(workdir: Path) -> dict[str, float]:
    """A whole edit through step1x-edit on the tiny models, each format against the bf16 edit."""
    sys.path.insert(0, str(REPO / "tests"))
    import cpu_torchvision  # the test machines' CUDA-built torchvision beside CPU torch

    cpu_torchvision.apply()
    from step1x_core.commands.cli import main
    from step1x_core.commands.bench_quantize import edit_image
    from step1x_core.testing.factory import make_tiny

    models = make_tiny(workdir / "tiny-models")
    source = models / "diffusion_models" / "step1x-edit-v1p1-official.safetensors"
    cat = REPO / "tests" / "data" / "cat.png"
    reference = edit_image(models, source, cat, workdir / "edit-bf16.png")
    errors = {}
    for fmt in FORMATS:  # the factory's own v1.1 DiT, quantized
        path = workdir / f"edit-dit-{fmt}{'.safetensors' if fmt == 'fp8' else '.gguf'}"
        quantize_dit(source, fmt, path, progress=False, overwrite=True)
        errors[fmt] = relative_error(edit_image(models, path, cat, workdir / f"edit-{fmt}.png"), reference)
    cast = workdir / "edit-fp8-cast.png"
    if main(["--models-dir", str(models), "--dit", str(source), "--weight-dtype", "float8_e4m3fn", "--image",
             str(cat), "--instruction", "add a red hat", "--output", str(cast), "--size-level", "64", "--steps",
             "2", "--seed", "0", "--quiet"]):
        raise RuntimeError("the fp8 cast edit failed")
    import numpy as np
    from PIL import Image

    image = torch.from_numpy(np.asarray(Image.open(cast).convert("RGB"), dtype=np.float32) / 255)
    errors[FP8_CAST] = relative_error(image, reference)
    return errors


def table(rows: list[dict], edits: dict[str, float]) -> str:
    base = {row["model"]: row for row in rows if row["format"] == "bf16"}
    lines = ["| model | format | file | full-size file | load RAM | load + call RAM | time / call | vs bf16 | "
             "call error | edit error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        b = base[row["model"]]
        edit = f"{edits[row['format']]:.4f}" if row["model"].startswith("tiny") and row["format"] in edits else ""
        lines.append(f"| {row['model']} | {row['format']} | {row['file_bytes'] / 1e6:.1f} MB | "
                     f"{full_size_bytes(row['format']) / 1e9:.1f} GB | {row['load_bytes'] / 1e6:.0f} MB | "
                     f"{row['load_and_call_bytes'] / 1e6:.0f} MB | {row['call_seconds'] * 1e3:.0f} ms | "
                     f"{row['call_seconds'] / b['call_seconds']:.2f}x | {row['call_error']:.4f} | {edit} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--single", type=int, default=1)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--skip-wide", action="store_true", help="only the tiny models")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from step1x_core.testing.factory import TEXT_GAIN
    from step1x_core.testing.tiny_dit import write_tiny_dit

    tiny = args.workdir / "tiny-v1.1.safetensors"
    if not tiny.exists():
        write_tiny_dit(tiny, "v1.1", text_hidden=64, text_gain=TEXT_GAIN)
    rows = measure(tiny, args.workdir, "tiny-v1.1", args.calls, latent=8)
    if not args.skip_wide:
        wide = args.workdir / f"wide-{args.depth}-{args.single}.safetensors"
        if not wide.exists():
            write_random_dit(wide, wide_dit_params(args.depth, args.single))
        rows += measure(wide, args.workdir, f"wide-{args.depth}+{args.single}", args.calls, latent=16)
    edits = edit_errors(args.workdir)
    (args.workdir / "quantize.json").write_text(json.dumps({"rows": rows, "edit_errors": edits}, indent=1))
    print(table(rows, edits))


if __name__ == "__main__":
    main()
