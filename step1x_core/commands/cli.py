"""`step1x-edit`: edit one image from the command line (or, without --image, make one from text).

    step1x-edit --image in.png --instruction "add a red hat" --output out.png --models-dir ComfyUI/models
    step1x-edit --image in.png --instruction "add a red hat" --output out.png --tiny   # smoke test
    step1x-edit --instruction "a poster that says \"HELLO\"" --width 1024 --height 768 --output t2i.png --tiny

Errors print one line on stderr and exit non-zero; the output PNG is written atomically.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..images.sizing import MAX_SIZE_LEVEL, MULTIPLE
from ..ops import COMPUTE_DTYPES, WEIGHT_DTYPES
from ..memory import EXIT_OUT_OF_MEMORY, OUT_OF_MEMORY, is_out_of_memory
from ..images.writing import Terminated, check_destination, save_png_atomically, signals_as_exceptions
from ..versions import VERSIONS

if TYPE_CHECKING:
    from ..pipeline import EditSettings



class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr, like every other error (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def seed_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**64 - 1, got {text}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def picture_side(text: str) -> int:
    """A text-to-image width or height: 16 to 4096 pixels (the largest size level; about 16.8 million
    pixels is already 16 times the area the model was trained at)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of pixels: {text!r}") from None
    if not MULTIPLE <= value <= MAX_SIZE_LEVEL:
        raise argparse.ArgumentTypeError(f"must be between {MULTIPLE} and {MAX_SIZE_LEVEL} pixels (1024 is the "
                                         f"model's native size), got {text}")
    return value


def device_name(text: str) -> str:
    """'auto' or a torch device that exists here (checked before any model is loaded)."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if not available.get(device.type, lambda: True)():
        raise argparse.ArgumentTypeError(f"{text}: this PyTorch ({torch.__version__}) has no {device.type} device; "
                                         "use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return text


def add_model_file_arguments(p: argparse.ArgumentParser) -> None:
    """--models-dir, --dit, --vae, --qwen, --tiny (shared by step1x-edit, -batch and -gedit)."""
    files = p.add_argument_group("model files (local paths)")
    files.add_argument("--models-dir", type=Path,
                       help="a ComfyUI-style models/ folder holding diffusion_models/, text_encoders/, vae/")
    files.add_argument("--dit", type=Path, help="Step1X-Edit DiT .safetensors (overrides --models-dir)")
    files.add_argument("--vae", type=Path, help="FLUX VAE ae.safetensors / vae.safetensors")
    files.add_argument("--qwen", type=Path,
                       help="Qwen2.5-VL-7B-Instruct: the Hugging Face folder or ComfyUI's single file "
                            "(qwen_2.5_vl_7b.safetensors, qwen_2.5_vl_7b_fp8_scaled.safetensors)")
    files.add_argument("--tiny", action="store_true", help="use tiny random models (a smoke test, no downloads)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The edit settings (EditSettings); a batch manifest may override some of them per item."""
    s = p.add_argument_group("sampling")
    s.add_argument("--negative", default="", help="negative instruction (default: empty, as the official code)")
    s.add_argument("--steps", type=int, default=28, help="denoising steps, 1 to 1000 (the official setting: 28)")
    s.add_argument("--cfg", type=finite_float, default=6.0, help="guidance scale; 1 disables the negative branch")
    s.add_argument("--seed", type=seed_value, default=0, help="0 to 2**64 - 1")
    s.add_argument("--size-level", type=int, default=1024,
                   help="work at about N*N pixels (512, 768, 1024; 16 to 4096)")
    s.add_argument("--norm-cfg-threshold", type=finite_float, default=None,
                   help="rescale CFG while t (0..1) > this; default: each version's reference (0.93 for v1.0/v1.1 "
                        "edits; every step for v1.2 and text-to-image); 1.0 = v1.0's code (never)")
    s.add_argument("--strength", type=finite_float, default=1.0, help="img2img strength; 1 starts from pure noise")
    s.add_argument("--resample", default="bicubic", choices=["bicubic", "lanczos", "bilinear"],
                   help="input resize filter")
    s.add_argument("--cfg-steps", type=int, help="speed: CFG on the first N steps only (changes the result)")
    s.add_argument("--step-cache", type=finite_float, metavar="THRESHOLD",
                   help="speed: reuse the later blocks while the first block's output changes less than this "
                        "(e.g. 0.05; changes the result)")
    s.add_argument("--keep-working-size", action="store_true",
                   help="return the result at the working resolution instead of the input's size")
    s.add_argument("--think", action="store_true",
                   help="v1.2: the MLLM rewrites the instruction first (the rewrite is printed)")
    s.add_argument("--reflect", type=int, default=0, metavar="ROUNDS",
                   help="v1.2: the MLLM judges each edit and re-edits, up to ROUNDS edits (the reference: 3; at "
                        "most 10); the best is written, the judge's log printed")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """How the models load and run: version override, device, dtypes, attention, offload, compile."""
    r = p.add_argument_group("runtime")
    r.add_argument("--version", choices=["auto", *VERSIONS], default="auto", help="override the detected version")
    r.add_argument("--device", type=device_name, default="auto",
                   help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    r.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default="auto", help="compute dtype (auto: bf16 on CUDA)")
    r.add_argument("--weight-dtype", choices=sorted(WEIGHT_DTYPES), default="default",
                   help="DiT weight storage; float8_e4m3fn halves its memory")
    r.add_argument("--attention", choices=["auto", "sdpa", "flash"], default="auto")
    r.add_argument("--offload", action="store_true", help="keep each model on the CPU except during its stage")
    r.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (slow first step)")
    r.add_argument("--fp8-matmul", action="store_true",
                   help="with --weight-dtype float8_e4m3fn: multiply the DiT's Linear layers in fp8 (torch._scaled_mm; "
                        "GPUs with fp8 tensor cores: Ada, Hopper, Blackwell). Faster there, slightly lossy")
    r.add_argument("--quiet", action="store_true", help="no progress bar or info logging")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="step1x-edit", description="Instruction-based image editing with Step1X-Edit.")
    p.add_argument("--image", type=Path, help="input image; without it, text-to-image (v1.1 and v1.2 DiTs)")
    p.add_argument("--instruction", required=True,
                   help='the edit, e.g. "make the sky stormy" (without --image: what to draw)')
    p.add_argument("--output", required=True, type=Path, help="where to write the PNG")
    p.add_argument("--width", type=picture_side,
                   help=f"text-to-image: width in pixels, {MULTIPLE} to {MAX_SIZE_LEVEL} (default 1024)")
    p.add_argument("--height", type=picture_side,
                   help=f"text-to-image: height in pixels, {MULTIPLE} to {MAX_SIZE_LEVEL} (default 1024)")
    add_model_file_arguments(p)
    add_sampling_arguments(p)
    add_runtime_arguments(p)
    return p


def edit_settings(args: argparse.Namespace) -> EditSettings:
    """The EditSettings the sampling arguments ask for (not yet validated)."""
    from ..pipeline import EditSettings

    return EditSettings(steps=args.steps, cfg_scale=args.cfg, seed=args.seed, size_level=args.size_level,
                        negative=args.negative, norm_cfg_threshold=args.norm_cfg_threshold,
                        strength=args.strength, resample=args.resample, restore_size=not args.keep_working_size,
                        cfg_steps=args.cfg_steps, step_cache=args.step_cache, think=args.think, reflect=args.reflect)


def load_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of Step1XEditPipeline.from_files that the runtime arguments ask for (version aside)."""
    return dict(device=None if args.device == "auto" else args.device, dtype=COMPUTE_DTYPES[args.dtype],
                weight_dtype=WEIGHT_DTYPES[args.weight_dtype], attention=args.attention, offload=args.offload,
                compile_blocks=args.compile, fp8_matmul=args.fp8_matmul)


def resolve_model_paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """The DiT, VAE and Qwen to load: named ones as given; from a models folder, the DiT of --version (or
    the first present), and the text encoder serving that DiT's version (v1.2 has its own)."""
    from ..dit.loading import peek_version
    from ..release_files import find_in_models_dir
    from ..testing.factory import tiny_models_dir
    from ..versions import Version

    models_dir = tiny_models_dir() if args.tiny else args.models_dir
    if models_dir is None:
        missing = [flag for flag, given in (("--dit", args.dit), ("--vae", args.vae), ("--qwen", args.qwen)) if not given]
        if missing:
            raise ValueError(f"no model given for {', '.join(missing)}: pass them, --models-dir or --tiny")
        return args.dit, args.vae, args.qwen
    version = None if args.version == "auto" else Version.parse(args.version)
    dit = args.dit or find_in_models_dir(models_dir, "dit", version)
    vae = args.vae or find_in_models_dir(models_dir, "vae")
    serves = version or (peek_version(dit) if Path(dit).exists() else None)
    qwen = args.qwen or find_in_models_dir(models_dir, "text_encoder", serves)
    return dit, vae, qwen


def check_model_paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """The DiT, VAE and Qwen paths the arguments name, each checked to exist."""
    from ..release_files import describe_missing

    paths = resolve_model_paths(args)
    for flag, path in zip(("--dit", "--vae", "--qwen"), paths):
        if not path.exists():
            raise FileNotFoundError(f"{flag} {path}: {describe_missing(path)}")
    return paths


def check_paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """Every path checked before anything is loaded: a wrong one costs one line, not a model load."""
    from ..images.reading import require_image_file

    if args.image is not None:
        require_image_file(args.image, "input image")
        if args.width is not None or args.height is not None:
            raise ValueError("--width/--height are for text-to-image (no --image); an edit keeps the input's size")
    if args.output.suffix.lower() != ".png":
        raise ValueError(f"--output {args.output}: the edit is saved as PNG; give a file name ending in .png")
    check_destination(args.output, [args.image] if args.image is not None else [])
    return check_model_paths(args)


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from ..images.reading import load_rgb
    from ..images.sizing import size_for_level
    from ..pipeline import Step1XEditPipeline
    from ..reasoning.report import format_run

    settings = edit_settings(args)
    settings.validate()  # every count and size within its bounds before a file is even looked at
    dit, vae, qwen = check_paths(args)
    image = load_rgb(args.image) if args.image is not None else None
    if image is not None:
        size_for_level(image.width, image.height, settings.size_level)  # size level and aspect ratio, before loading
    if settings.reasoning and image is None:
        raise ValueError("--think/--reflect judge an edit of an input image; text-to-image has none")
    pipe = Step1XEditPipeline.from_files(dit, vae, qwen, version=None if args.version == "auto" else args.version,
                                         reasoning=settings.reasoning, **load_options(args))
    edits = max(1, settings.reflect)
    with tqdm(total=args.steps * edits, desc="editing" if image else "drawing", unit="step", disable=args.quiet) as bar:
        step = lambda i, n, x: bar.update(1)  # noqa: E731
        if image is None:
            result = pipe.generate(args.instruction, args.width or 1024, args.height or 1024, settings, callback=step)
        elif settings.reasoning:
            reasoned = pipe.reason(image, args.instruction, settings, callback=step)
            result = reasoned.image
        else:
            result = pipe(image, args.instruction, settings, callback=step)
    if settings.reasoning and not args.quiet:
        print(format_run(reasoned.run) if reasoned.run is not None else f"rewritten instruction: {reasoned.instruction}")
    save_png_atomically(result, args.output)
    if not args.quiet:
        print(f"wrote {args.output} ({result.width}x{result.height})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    if args.quiet:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
        with signals_as_exceptions():  # SIGTERM unwinds like Ctrl-C: a save in progress removes its temporary file
            run(args)
    except KeyboardInterrupt:
        print("step1x-edit: interrupted; no output written", file=sys.stderr)
        return 130
    except Terminated as stop:
        print(f"step1x-edit: stopped by {stop}; no output written", file=sys.stderr)
        return 128 + stop.signum
    except (MemoryError, RuntimeError, ValueError, OSError) as err:
        if is_out_of_memory(err):
            print(f"step1x-edit: error: {OUT_OF_MEMORY}", file=sys.stderr)
            return EXIT_OUT_OF_MEMORY
        if isinstance(err, RuntimeError):
            raise
        print(f"step1x-edit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
