"""End-to-end benchmark of one edit: `python -m step1x_core.commands.bench_pipeline [--config tiny|full]`.

The official performance table's rows (bf16 and fp8 DiT weights, each with and without offloading) on
the whole pipeline: Qwen2.5-VL encode, connector, 28 Euler steps with CFG, VAE encode and decode. Full size
uses random weights of the real shapes (built on the device, nothing is downloaded), so the timings and
peak memory are real and the pictures are noise. Reports seconds per edit, peak memory and ratios against
the first row, run in the same process. Never used as a timed test.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..dit.checkpoint import LoadedCheckpoint
from ..dit.loading import build_dit
from ..dit.model import Step1XEditDiT
from ..dit.params import STEP1X_EDIT_PARAMS, DiTParams
from ..pipeline import EditSettings, Step1XEditPipeline
from ..qwen.embedder import QwenVLEmbedder
from ..qwen.packaged import PACKAGED_CONFIG, PACKAGED_TOKENIZER
from ..qwen.single_file import build_skeleton
from ..qwen.vision_input import load_image_processor
from ..testing.tiny_dit import tiny_dit_params
from ..testing.tiny_qwen import tiny_qwen_config
from ..testing.tiny_vae import tiny_vae_params
from ..vae.model import AutoEncoder
from ..vae.params import FLUX_AE_PARAMS, AutoEncoderParams
from .bench_measure import meta_model, sync

# name -> (DiT weight dtype, offload); the official table's rows in its order
VARIANTS = {"bf16": (None, False), "fp8": (torch.float8_e4m3fn, False), "bf16 + offload": (None, True),
            "fp8 + offload": (torch.float8_e4m3fn, True)}


@dataclass(frozen=True)
class Sizes:
    dit: DiTParams
    vae: AutoEncoderParams
    qwen_config: dict


def sizes(config: str) -> Sizes:
    if config == "tiny":
        return Sizes(tiny_dit_params("v1.1"), tiny_vae_params(), tiny_qwen_config())
    qwen = json.loads((PACKAGED_CONFIG / "config.json").read_text())
    return Sizes(STEP1X_EDIT_PARAMS.with_version("v1.1"), FLUX_AE_PARAMS, qwen)


@torch.no_grad()
def _init_random(module: torch.nn.Module) -> None:
    """Small random weights written in place: norms one, biases zero, matrices ~ N(0, 1/fan_in)."""
    for name, param in module.named_parameters():
        if name.endswith((".scale", "norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight", "layernorm.weight")):
            param.fill_(1.0)
        elif param.ndim >= 2:
            param.normal_(std=param[0].numel() ** -0.5)
        else:
            param.zero_()


def random_dit(params: DiTParams, dtype: torch.dtype, weight_dtype: torch.dtype | None,
               device: torch.device) -> Step1XEditDiT:
    model = meta_model(params).to_empty(device=device).to(dtype).eval().requires_grad_(False)
    _init_random(model)
    if weight_dtype is None:
        return model
    fp8 = build_dit(LoadedCheckpoint(model.state_dict(), params, "original", dtype), weight_dtype, device)
    del model
    return fp8


def random_vae(params: AutoEncoderParams, device: torch.device) -> AutoEncoder:
    model = AutoEncoder(params, device="meta").to_empty(device=device).eval().requires_grad_(False)
    _init_random(model)
    return model


def random_embedder(config: dict, dtype: torch.dtype, device: torch.device) -> QwenVLEmbedder:
    from transformers import AutoTokenizer, Qwen2_5_VLConfig

    model = build_skeleton(Qwen2_5_VLConfig.from_dict(config), dtype)
    # to_empty would also blank the rotary tables, which the skeleton computed: keep them.
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    for name, value in buffers.items():
        model.get_buffer(name).copy_(value)
    _init_random(model)
    model.eval().requires_grad_(False)
    return QwenVLEmbedder(model, AutoTokenizer.from_pretrained(str(PACKAGED_TOKENIZER)),
                          load_image_processor(PACKAGED_CONFIG), dtype=dtype)


def _peak_bytes(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device)}


def run_variant(name: str, s: Sizes, image: Image.Image, settings: EditSettings, embedder: QwenVLEmbedder,
                vae: AutoEncoder, device: torch.device, dtype: torch.dtype) -> dict:
    weight_dtype, offload = VARIANTS[name]
    dit = random_dit(s.dit, dtype, weight_dtype, device)
    home = torch.device("cpu") if offload else device
    for model in (dit, vae, embedder):
        model.to(home)
    pipe = Step1XEditPipeline(dit, vae, embedder, device=device, dtype=dtype, offload=offload)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    result = pipe(image, "add a red hat to the cat", settings)
    sync(device)
    seconds = time.perf_counter() - start
    entry = {"seconds_per_edit": seconds, "output_size": list(result.size), **_peak_bytes(device)}
    del pipe, dit
    return entry


def benchmark(config: str, device: torch.device, dtype: torch.dtype, size: int, steps: int,
              variants: list[str]) -> dict:
    torch.manual_seed(0)
    s = sizes(config)
    image = Image.new("RGB", (size, size), (120, 90, 60))
    settings = EditSettings(steps=steps, size_level=size, seed=0)
    embedder = random_embedder(s.qwen_config, dtype, device)
    vae = random_vae(s.vae, device)
    warm = run_variant(variants[0], s, image, EditSettings(steps=1, size_level=size), embedder, vae, device, dtype)
    results = {name: run_variant(name, s, image, settings, embedder, vae, device, dtype) for name in variants}
    first = results[variants[0]]["seconds_per_edit"]
    for entry in results.values():
        entry["speedup_vs_first"] = first / entry["seconds_per_edit"]
    return {"config": config, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "size": size,
            "steps": steps, "warm_up_seconds": warm["seconds_per_edit"],
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
                       + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
            "results": results}


def format_table(report: dict) -> str:
    lines = [f"Step1X-Edit pipeline benchmark: {report['config']}, {report['size']}², {report['steps']} steps, "
             f"{report['device']} {report['dtype']}; {report['machine']}", "",
             f"{'DiT weights':20} {'s/edit':>9} {'speed-up':>9} {'peak GiB':>9}"]
    for name, r in report["results"].items():
        peak = f"{r['peak_allocated_bytes'] / 2**30:9.1f}" if "peak_allocated_bytes" in r else f"{'-':>9}"
        lines.append(f"{name:20} {r['seconds_per_edit']:9.2f} {r['speedup_vs_first']:8.2f}x {peak}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m step1x_core.commands.bench_pipeline",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--size", type=int, default=None, help="size level (default: 1024 full, 64 tiny)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = args.size or (1024 if args.config == "full" else 64)
    report = benchmark(args.config, device, dtype, size, args.steps, variants)
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
