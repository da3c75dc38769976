"""What the benchmark measures and estimates: matmul FLOPs, wall time, peak memory, checkpoint loading,
and the VRAM a configuration needs."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ..dit.model import Step1XEditDiT
from ..dit.params import STEP1X_EDIT_PARAMS, DiTParams
from ..testing.tiny_dit import tiny_dit_state_dict

TEXT_TOKENS = 640


# --- FLOPs ---------------------------------------------------------------------------------------
def flops_per_forward(p: DiTParams, target_tokens: int, text_tokens: int = TEXT_TOKENS,
                      with_connector_refiner: bool = True) -> float:
    """Matmul FLOPs of one DiT call for one sample (image tokens = target + reference)."""
    h, m = p.hidden_size, p.mlp_hidden
    img, seq = 2 * target_tokens, 2 * target_tokens + text_tokens
    attention = 4 * seq * seq * h  # QK^T and AV
    double = 2 * (4 * h * h + 2 * h * m) * seq + attention
    single = 2 * (h * (3 * h + m) + (h + m) * h) * seq + attention
    embed = 2 * (p.in_channels * h * img + p.context_in_dim * h * text_tokens + h * p.out_channels * img)
    total = p.depth * double + p.depth_single_blocks * single + embed
    if with_connector_refiner:
        c = p.connector
        total += c.depth * (2 * (4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.mlp_hidden) * text_tokens
                            + 4 * text_tokens ** 2 * c.hidden_size)
    return float(total)


# --- measurements --------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_call(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def measure_loading(params: DiTParams, dtype: torch.dtype, workdir: Path) -> dict:
    """Write the configuration as a checkpoint, then load it in a fresh process: seconds and the
    growth of peak RSS relative to the file size."""
    path = workdir / "bench_dit.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.to(dtype) for k, v in tiny_dit_state_dict(params).items()}, str(path))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    probe = ("import sys, time; from step1x_core.dit.loading import load_dit\n"
             "def peak():\n    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status')"
             " if l.startswith('VmHWM'))\n"
             "before = peak(); start = time.perf_counter(); m = load_dit(sys.argv[1])\n"
             "sum(float(p.sum()) for p in m.parameters())  # read every weight once\n"
             "print(time.perf_counter() - start, peak() - before)")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    seconds, growth = map(float, out.stdout.split()[-2:])
    size = path.stat().st_size
    path.unlink()
    return {"file_bytes": size, "load_seconds": seconds, "peak_rss_growth_bytes": int(growth),
            "peak_rss_growth_vs_file": growth / size}


# --- memory estimates ----------------------------------------------------------------------------
def vram_estimate_gib(params: DiTParams, image_size: int, weight_bytes: float, qwen_on_gpu: bool) -> float:
    """Weights plus the largest activations of one CFG step, computed from the model (a planning
    number; the GPU measurement in the README is the ground truth)."""
    tokens = 2 * (image_size // 16) ** 2 + TEXT_TOKENS
    dit_params = sum(p.numel() for p in meta_model(params).parameters())
    activations = 2 * tokens * (3 * params.hidden_size + params.mlp_hidden) * 2 * 3  # batch 2, bf16, a few live
    qwen = 8.3e9 * 2 if qwen_on_gpu else 0  # Qwen2.5-VL-7B in bf16 while encoding
    return (dit_params * weight_bytes + activations + qwen) / 2**30


def meta_model(params: DiTParams) -> Step1XEditDiT:
    with torch.device("meta"):
        return Step1XEditDiT(params)


def vram_table() -> str:
    rows = ["", "estimated VRAM (GiB) for the full model, DiT on the GPU, Qwen offloaded after encoding:",
            f"{'size level':>10} {'bf16':>8} {'fp8':>8}"]
    params = STEP1X_EDIT_PARAMS
    for size in (512, 768, 1024):
        rows.append(f"{size:>10} {vram_estimate_gib(params, size, 2, False):8.1f} "
                    f"{vram_estimate_gib(params, size, 1, False):8.1f}")
    return "\n".join(rows)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
