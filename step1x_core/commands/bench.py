"""Benchmark of the Step1X-Edit engine: `python -m step1x_core.commands.bench [--config tiny|slice|full]`.

Measures, for one configuration and in one process, the baseline (the official algorithm's plain
path: the whole connector recomputed inside every DiT call) against each optimisation, and
reports seconds per step and per edit, peak memory, checkpoint load time and peak RAM while
loading, model FLOPs per step and achieved FLOP/s, plus the error of lossy options against the
exact result. Prints a table and, with --json, writes the numbers. Never used as a timed test.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..sampling.latents import edit_ids, pack
from ..sampling.loop import DiTText, Guidance, denoise
from ..sampling.official import OfficialFlow, get_schedule
from ..dit.params import STEP1X_EDIT_PARAMS, DiTParams
from ..dit.connector import ConnectorContext
from ..dit.checkpoint import LoadedCheckpoint
from ..dit.loading import build_dit
from ..dit.model import StepCache, Step1XEditDiT
from ..ops import fp8_matmul_available
from ..testing.tiny_dit import tiny_dit_params, tiny_dit_state_dict
from .bench_measure import (TEXT_TOKENS, flops_per_forward, measure_loading, meta_model, peak_memory_bytes,
                            relative_error, sync, time_call, vram_table)



@dataclass(frozen=True)
class BenchConfig:
    name: str
    params: DiTParams
    image_size: int  # the working resolution: target tokens = (size / 16) ** 2
    steps: int


def configs(image_size: int | None, steps: int | None) -> dict[str, BenchConfig]:
    full_width_slice = DiTParams(depth=2, depth_single_blocks=2, version="v1.1")
    return {
        "tiny": BenchConfig("tiny", tiny_dit_params("v1.1"), image_size or 256, steps or 4),
        "slice": BenchConfig("slice (2 double + 2 single blocks at full width)", full_width_slice,
                             image_size or 512, steps or 2),
        "full": BenchConfig("full", STEP1X_EDIT_PARAMS.with_version("v1.1"), image_size or 1024, steps or 28),
    }


def warm_up(model: Step1XEditDiT, s: Scenario, ctx: ConnectorContext) -> None:
    """One DiT call at the real shapes before any timing (allocator, kernels, lazy init)."""
    img = torch.cat([s.target.expand(2, -1, -1), s.reference.expand(2, -1, -1)], dim=1)
    t = torch.full((2,), 1.0, dtype=s.target.dtype, device=s.target.device)
    model.forward_context(img, s.img_ids, s.txt_ids, t, ctx)


class Scenario:
    """Random inputs of the real shapes for one edit: noise, reference, Qwen embeddings, masks."""

    def __init__(self, cfg: BenchConfig, device: torch.device, dtype: torch.dtype):
        gen = torch.Generator().manual_seed(0)
        lat = cfg.image_size // 8
        p = cfg.params
        self.target = pack(torch.randn(1, 16, lat, lat, generator=gen)).to(device, dtype)
        self.reference = pack(torch.randn(1, 16, lat, lat, generator=gen)).to(device, dtype)
        self.llm = (torch.randn(2, TEXT_TOKENS, p.connector.in_channels, generator=gen) * 0.5).to(device, dtype)
        self.mask = torch.zeros(2, TEXT_TOKENS, dtype=torch.long, device=device)
        self.mask[0, :350], self.mask[1, :343] = 1, 1  # typical valid lengths (cond, uncond)
        self.img_ids, self.txt_ids = edit_ids(lat, lat, 2, p.version, TEXT_TOKENS, device=device)
        self.timesteps = get_schedule(cfg.steps, self.target.shape[1])


class RecomputingConnector:
    """The official call pattern: the connector runs whole inside every DiT call."""

    def __init__(self, model: Step1XEditDiT, llm: torch.Tensor, mask: torch.Tensor):
        self.model, self.llm, self.mask = model, llm, mask

    def forward_context(self, img, img_ids, txt_ids, timesteps, ctx, t_vec=None, cache=None):
        rows = slice(0, img.shape[0])
        return self.model(img, img_ids, txt_ids, timesteps, self.llm[rows], timesteps, self.mask[rows])


def run_edit(model, s: Scenario, ctx: ConnectorContext, recompute_connector: bool = False, two_calls: bool = False,
             cfg_steps: int | None = None, new_cache: Callable[[], StepCache] | None = None) -> torch.Tensor:
    velocity = RecomputingConnector(model, s.llm, s.mask) if recompute_connector else model
    text = DiTText(ctx, s.txt_ids)
    flow = OfficialFlow(s.timesteps, batched_guidance=not two_calls)
    return denoise(velocity, flow, s.target, s.img_ids, text.select(0), text.select(1), Guidance(cfg_steps=cfg_steps),
                   reference=s.reference, new_cache=new_cache)


def benchmark(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, variants: list[str],
              cache_threshold: float, cfg_steps: int, measure_load: bool) -> dict:
    torch.manual_seed(0)
    build_start = time.perf_counter()
    model = meta_model(cfg.params).to_empty(device=device).to(dtype).eval().requires_grad_(False)
    if cfg.name == "tiny":
        model.load_state_dict(tiny_dit_state_dict(cfg.params))
    else:
        _init_random(model)
    build_seconds = time.perf_counter() - build_start
    s = Scenario(cfg, device, dtype)
    step_flops = 2 * flops_per_forward(cfg.params, s.target.shape[1])  # CFG: two samples per step
    results: dict[str, dict] = {}
    exact = None
    caches = _CacheLog(cache_threshold)
    with torch.inference_mode():
        ctx = model.connector.precompute(s.llm, s.mask)
        warm_up(model, s, ctx)
        plans = {
            "baseline (connector recomputed every call)": lambda: run_edit(model, s, ctx, recompute_connector=True),
            "ours (connector precomputed once)": lambda: run_edit(model, s, ctx),
            "cfg as two calls": lambda: run_edit(model, s, ctx, two_calls=True),
            f"cfg truncation (uncond for {cfg_steps} steps)": lambda: run_edit(model, s, ctx, cfg_steps=cfg_steps),
            f"step cache (threshold {cache_threshold})": lambda: run_edit(model, s, ctx,
                                                                          new_cache=caches.new),
        }
        if "compile" in variants:
            plans["torch.compile (blocks)"] = lambda: run_edit(model, s, ctx)
        if "fp8" in variants:
            plans.update(_fp8_plans(model, cfg, s, device, dtype))
        for name, plan in plans.items():
            if not _wanted(name, variants):
                continue
            compile_seconds = None
            if name.startswith("torch.compile"):
                compile_seconds = _compile_blocks(model, lambda: run_edit(model, s, ctx), device)
            seconds, out = time_call(plan, device)
            if exact is None and name.startswith("ours"):
                exact = out
            results[name] = {"seconds_per_edit": seconds, "seconds_per_step": seconds / cfg.steps,
                             "achieved_flops_per_second": step_flops * cfg.steps / seconds,
                             "compile_seconds": compile_seconds, "out": out}
            if name.startswith("step cache"):
                results[name]["cache_hits"] = caches.last.hits
                results[name]["cache_misses"] = caches.last.misses
    baseline = next(iter(results.values()))["seconds_per_edit"]
    for entry in results.values():
        entry["speedup_vs_baseline"] = baseline / entry["seconds_per_edit"]
        out = entry.pop("out")
        entry["error_vs_exact"] = relative_error(out, exact) if exact is not None else None
    report = {
        "config": cfg.name, "image_size": cfg.image_size, "steps": cfg.steps, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "target_tokens": s.target.shape[1], "text_tokens": TEXT_TOKENS,
        "parameters": sum(p.numel() for p in model.parameters()), "model_build_seconds": build_seconds,
        "flops_per_step": step_flops, "peak_memory_bytes": peak_memory_bytes(device),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "results": results,
    }
    if measure_load:
        with tempfile.TemporaryDirectory() as tmp:
            report["loading"] = measure_loading(cfg.params, torch.bfloat16, Path(tmp))
    return report


class _CacheLog:
    """Creates the step cache of each timed run and keeps the last one for its hit count."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.last: StepCache | None = None

    def new(self) -> StepCache:
        self.last = StepCache(self.threshold)
        return self.last


def _fp8_plans(model: Step1XEditDiT, cfg: BenchConfig, s: Scenario, device: torch.device,
               dtype: torch.dtype) -> dict[str, Callable[[], torch.Tensor]]:
    """The same weights stored as float8_e4m3fn: cast one layer at a time, and (where torch._scaled_mm
    runs fp8) multiplied in fp8."""
    ckpt = LoadedCheckpoint(model.state_dict(), cfg.params, "original", dtype)
    plans = {}
    kinds = {"fp8 weights (cast per layer)": False, "fp8 matmul (torch._scaled_mm)": True}
    for name, matmul in kinds.items():
        if matmul and not fp8_matmul_available(device):
            print(f"skipping {name}: torch._scaled_mm has no fp8 kernel on {device}", file=sys.stderr)
            continue
        fp8_model = build_dit(ckpt, torch.float8_e4m3fn, device, fp8_matmul=matmul)
        fp8_ctx = fp8_model.connector.precompute(s.llm, s.mask)
        plans[name] = lambda m=fp8_model, c=fp8_ctx: run_edit(m, s, c)
    return plans


def _wanted(name: str, variants: list[str]) -> bool:
    keys = {"baseline": "baseline", "ours": "ours", "cfg as two": "split", "cfg truncation": "truncate",
            "step cache": "cache", "torch.compile": "compile", "fp8": "fp8"}
    key = next(v for k, v in keys.items() if name.startswith(k))
    return key in ("baseline", "ours") or key in variants


@torch.no_grad()
def _init_random(model: Step1XEditDiT) -> None:
    """Full-width random weights written in place (no second copy of a multi-GB state dict)."""
    for name, param in model.named_parameters():
        if name.endswith(".scale"):
            param.fill_(1.0)
        elif param.ndim >= 2:
            param.normal_(std=param.shape[1] ** -0.5)
        else:
            param.zero_()


def _compile_blocks(model: Step1XEditDiT, run: Callable[[], torch.Tensor], device: torch.device) -> float:
    model.compile_blocks()
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


# --- output --------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    lines = [f"Step1X-Edit benchmark: {report['config']}, {report['image_size']}² "
             f"({report['target_tokens']} target tokens), {report['steps']} steps, {report['device']} "
             f"{report['dtype']}; {report['machine']}",
             f"parameters {report['parameters'] / 1e6:.1f} M, {report['flops_per_step'] / 1e12:.3f} TFLOP per "
             f"step (CFG), peak memory {report['peak_memory_bytes'] / 2**30:.2f} GiB", "",
             f"{'path':48} {'s/step':>9} {'s/edit':>9} {'TFLOP/s':>8} {'speed-up':>9} {'error':>9}"]
    for name, r in report["results"].items():
        error = "-" if r["error_vs_exact"] is None else f"{r['error_vs_exact']:.1e}"
        lines.append(f"{name:48} {r['seconds_per_step']:9.3f} {r['seconds_per_edit']:9.3f} "
                     f"{r['achieved_flops_per_second'] / 1e12:8.3f} {r['speedup_vs_baseline']:8.2f}x {error:>9}")
        if r["compile_seconds"] is not None:
            lines.append(f"{'':48} compile time {r['compile_seconds']:.1f} s")
        if "cache_hits" in r:
            lines.append(f"{'':48} {r['cache_hits']} of {r['cache_hits'] + r['cache_misses']} steps reused")
    if "loading" in report:
        load = report["loading"]
        lines += ["", f"checkpoint load: {load['file_bytes'] / 2**20:.0f} MiB in {load['load_seconds']:.2f} s, "
                      f"peak RSS growth {load['peak_rss_growth_vs_file']:.2f}x the file"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m step1x_core.commands.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "slice", "full"], default="tiny")
    parser.add_argument("--size", type=int, help="working resolution (default: 256 tiny, 512 slice, 1024 full)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 4 tiny, 2 slice, 28 full)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bf16 on CUDA, float32 on CPU")
    parser.add_argument("--variants", default="split,truncate,cache",
                        help="comma list of: split, truncate, cache, compile, fp8 (baseline and ours always run)")
    parser.add_argument("--cache-threshold", type=float, default=0.05)
    parser.add_argument("--cfg-steps", type=int, default=1, help="CFG truncation: guided steps before cond only")
    parser.add_argument("--no-load", action="store_true", help="skip the checkpoint loading measurement")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = configs(args.size, args.steps)[args.config]
    report = benchmark(cfg, device, dtype, args.variants.split(","), args.cache_threshold, args.cfg_steps,
                       measure_load=not args.no_load and args.config != "full")
    report["config_params"] = asdict(cfg.params)
    print(format_table(report))
    print(vram_table())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
