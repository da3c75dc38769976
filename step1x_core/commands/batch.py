"""`step1x-edit-batch`: edit every item of a manifest into a folder, resumably, here or on Ray.

    step1x-edit-batch --models-dir ComfyUI/models --manifest edits.jsonl --out edited/
    step1x-edit-batch --models-dir ComfyUI/models --manifest edits.jsonl --out edited/ --ray            # local Ray
    step1x-edit-batch --models-dir ComfyUI/models --manifest edits.jsonl --out edited/ --ray HOST:6379  # a cluster

The edit options of `step1x-edit` are every item's defaults; the manifest may override seed, negative,
size_level, steps, cfg and version per item. Run the same command again to resume: finished items
are kept. One run per --out folder (OUT/.step1x-edit.lock). Exit status: 0 all items ok, 1 some items
failed (see OUT/results.jsonl), 2 bad input (or the folder in use), 3 out of memory (the models, or any
item), 130 interrupted.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import logging
import os
import signal
import sys
from pathlib import Path

from ..memory import EXIT_OUT_OF_MEMORY, OUT_OF_MEMORY, is_out_of_memory
from .cli import (OneLineParser, add_model_file_arguments, add_runtime_arguments, add_sampling_arguments,
                  check_model_paths, edit_settings, load_options)

PROG = "step1x-edit-batch"


# Each batch worker holds a whole set of models (25 GB and more): past this many a run is a typo.
MAX_WORKERS = 1024


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def worker_count(text: str) -> int:
    """--workers: 1 to MAX_WORKERS (a local Ray cluster is further bounded by this machine's CPUs)."""
    value = positive_int(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_WORKERS} (each worker loads every model), got {text}")
    return value


def out_of_memory_status(prog: str, failed: int) -> int:
    """Exit 3 with the out-of-memory line when ``failed`` items ran out of memory."""
    print(f"{prog}: error: {OUT_OF_MEMORY} ({failed} item(s) ran out of memory; see results.jsonl)", file=sys.stderr)
    return EXIT_OUT_OF_MEMORY


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """What every batch run takes (shared with step1x-edit-gedit): Ray, then step1x-edit's model files,
    sampling and runtime options."""
    g = p.add_argument_group("scale out (Ray)")
    g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray: alone, a local cluster on this machine; with an address (HOST:6379, or "
                        "'auto' for the cluster this machine belongs to), that cluster. One worker per GPU")
    g.add_argument("--workers", type=worker_count, metavar="N",
                   help="with --ray: N CPU workers instead of one per GPU (a local cluster: at most this machine's "
                        "CPUs)")
    add_model_file_arguments(p)
    add_sampling_arguments(p)
    add_runtime_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Edit every item of a manifest (JSON Lines, CSV or a Hugging Face "
                                             "datasets table) with Step1X-Edit, resumably, here or on Ray.")
    p.add_argument("--manifest", required=True, type=Path,
                   help='.jsonl ({"id", "image", "instruction"} a line; optional seed, negative, size_level, steps, '
                        "cfg, version, think, reflect), .csv with the same columns, or a datasets folder / .parquet")
    p.add_argument("--out", required=True, type=Path, help="folder for OUT/<id>.png and OUT/results.jsonl")
    add_run_arguments(p)
    return p


def run_setup(args: argparse.Namespace):
    """The run's defaults and model files from the edit options, checked before anything loads."""
    from ..batch.plan import RunDefaults
    from ..batch.worker import ModelFiles
    from ..testing.factory import tiny_models_dir

    if args.workers is not None and args.ray is None:
        raise ValueError("--workers sets the number of Ray CPU workers; add --ray (without it the batch runs "
                         "in this process)")
    cpus = os.cpu_count() or 1
    if args.workers is not None and args.ray == "local" and args.workers > cpus:
        raise ValueError(f"--workers {args.workers}: this machine has {cpus} CPUs, and each worker holds every "
                         f"model; give at most {cpus}, or a cluster's address with --ray")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder")
    settings = edit_settings(args)
    settings.validate()
    dit, vae, qwen = check_model_paths(args)
    defaults = RunDefaults(settings, dit, None if args.version == "auto" else args.version,
                           tiny_models_dir() if args.tiny else args.models_dir,
                           {"dtype": args.dtype, "weight_dtype": args.weight_dtype, "fp8_matmul": args.fp8_matmul})
    return defaults, ModelFiles(str(vae), str(qwen), load_options(args))


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: finished items stay recorded, nothing is half-written."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def run_guarded(prog: str, out: Path, work, errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``work()`` holding ``out``'s lock (one run per output folder, taken before any model loads) with
    the commands' conventions: one line on stderr for an error (exit 2; ``errors`` adds the command's own),
    exit 130 (143 for SIGTERM) when interrupted, else the status ``work`` returns."""
    from ..batch.lock import FolderInUse, OutputLock
    from ..batch.manifest import ManifestError
    from ..batch.ray_runner import RayUnavailable
    from ..batch.runner import BatchAborted

    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        with OutputLock(out, prog):
            return work()
    except KeyboardInterrupt as err:
        print(f"{prog}: interrupted; finished items are recorded in {out}; run the same command again to resume",
              file=sys.stderr)
        return 128 + (err.signum if isinstance(err, Interrupted) else signal.SIGINT)
    except (FolderInUse, ManifestError, BatchAborted, RayUnavailable, ValueError, OSError, MemoryError, RuntimeError,
            *errors) as err:
        if is_out_of_memory(err):
            print(f"{prog}: error: {OUT_OF_MEMORY}", file=sys.stderr)
            return EXIT_OUT_OF_MEMORY
        if isinstance(err, (RuntimeError, MemoryError)) and not isinstance(
                err, (FolderInUse, BatchAborted, RayUnavailable, *errors)):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.quiet)

    def work() -> int:
        from ..batch.manifest import read_manifest
        from ..batch.plan import asks_for_reasoning
        from ..batch.runner import run_batch

        items = read_manifest(args.manifest)
        defaults, files = run_setup(args)
        if defaults.settings.reasoning or asks_for_reasoning(items):  # v1.2's MLLM writes: keep its LM head
            files = replace(files, load={**files.load, "reasoning": True})
        summary = run_batch(items, defaults, files, args.out, ray=args.ray, workers=args.workers,
                            progress=not args.quiet)
        if not args.quiet:
            print(f"{summary.ok} of {summary.total} ok, {summary.errors} failed ({summary.skipped} done before, "
                  f"{summary.ran} run now); see {args.out / 'results.jsonl'}")
        if summary.out_of_memory:
            return out_of_memory_status(PROG, summary.out_of_memory)
        return 1 if summary.errors else 0

    return run_guarded(PROG, args.out, work)


if __name__ == "__main__":
    sys.exit(main())
