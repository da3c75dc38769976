"""`step1x-edit-gedit`: run GEdit-Bench: edit its samples, score them with VIEScore, tabulate.

    step1x-edit-gedit --data GEdit-Bench/ --out results/step1x --models-dir ComfyUI/models \\
        --judge qwen --judge-model models/Qwen2.5-VL-72B-Instruct-AWQ
    step1x-edit-gedit --data GEdit-Bench/ --out results/step1x --models-dir ComfyUI/models --ray \\
        --judge http --judge-url https://api.openai.com/v1 --judge-model gpt-4.1   # key: $OPENAI_API_KEY

Edits go to OUT/fullset/<task_type>/<language>/<key>.png (beside <key>_SRCIMG.png), through the batch
runner (resumable; --ray spreads them over a cluster). Verdicts go to OUT/viescore/<judge>/scores.jsonl
(resumable too), the table to statistics.csv and statistics.md beside it, and below it the per-task-type
files that the official calculate_statistics.py reads (<out name>/<backbone>/eval_results_new/). --stage
edit or score runs one half. One run per --out folder (the batch's lock). Exit status: 0 every sample
edited and scored, 1 some were not, 2 bad input (or the folder in use), 3 out of memory, 130 interrupted.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch

from .batch import (add_run_arguments, configure_logging, out_of_memory_status, positive_int, run_guarded,
                    run_setup)
from .cli import OneLineParser

PROG = "step1x-edit-gedit"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
# The official scripts' --backbone (a folder name in their layout): qwen25vl for the Qwen2.5-VL judge,
# gpt4o for the OpenAI client (GPT-4.1 in the paper).
OFFICIAL_BACKBONES = {"qwen": "qwen25vl", "http": "gpt4o"}
# The official judges answer in at most 512 (Qwen) or 1400 (GPT) tokens; a verdict never needs more than this.
MAX_JUDGE_TOKENS = 8192


def judge_tokens(text: str) -> int:
    value = positive_int(text)
    if value > MAX_JUDGE_TOKENS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_JUDGE_TOKENS} (the official judges use 512 and "
                                         f"1400), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="GEdit-Bench for Step1X-Edit: edit, score with VIEScore, tabulate.")
    p.add_argument("--data", required=True, type=Path,
                   help="a local copy of stepfun-ai/GEdit-Bench (its folder, a save_to_disk folder or .parquet files)")
    p.add_argument("--out", required=True, type=Path, help="results folder (OUT/fullset/..., OUT/viescore/...)")
    p.add_argument("--stage", choices=["all", "edit", "score"], default="all", help="run both halves or one")
    p.add_argument("--languages", nargs="+", metavar="LANG", help="only these instruction languages (en, cn)")
    p.add_argument("--task-types", nargs="+", metavar="TYPE", help="only these task types (e.g. subject-add)")
    j = p.add_argument_group("judge (VIEScore)")
    j.add_argument("--judge", choices=["qwen", "http"],
                   help="qwen: a local Qwen2.5-VL folder through transformers; http: an OpenAI-compatible endpoint")
    j.add_argument("--judge-model", help="qwen: the model folder (Qwen2.5-VL-72B-Instruct-AWQ as published, 7B for a "
                                         "quick score); http: the model name (e.g. gpt-4.1)")
    j.add_argument("--judge-url", help="http: the endpoint's base URL (e.g. https://api.openai.com/v1)")
    j.add_argument("--judge-key-env", metavar="VAR",
                   help=f"http: the environment variable holding the API key (default: {DEFAULT_KEY_ENV}, if set)")
    j.add_argument("--judge-device", help="qwen: cpu, cuda, cuda:1 ... (default: every GPU, else the CPU)")
    j.add_argument("--judge-max-tokens", type=judge_tokens, metavar="N",
                   help="longest answer (default: 512 for qwen, 1400 for http, as the official judges)")
    add_run_arguments(p)
    return p


def judge_factory(args: argparse.Namespace):
    """Check the judge options now (before hours of editing) and return what builds the judge later."""
    from ..gedit.judges import HttpJudge, QwenJudge

    if args.judge is None:
        raise ValueError("scoring needs a judge: --judge qwen --judge-model FOLDER, or --judge http --judge-url URL "
                         "--judge-model NAME (or --stage edit to only edit)")
    if not args.judge_model:
        raise ValueError(f"--judge {args.judge} needs --judge-model")
    limit = {} if args.judge_max_tokens is None else {"max_new_tokens" if args.judge == "qwen" else "max_tokens":
                                                      args.judge_max_tokens}
    if args.judge == "qwen":
        if not Path(args.judge_model).expanduser().is_dir():
            raise ValueError(f"--judge-model {args.judge_model}: no such folder; give a local Qwen2.5-VL "
                             "(e.g. Qwen2.5-VL-72B-Instruct-AWQ) folder")
        return lambda: QwenJudge(args.judge_model, device=args.judge_device, **limit)
    if not args.judge_url:
        raise ValueError("--judge http needs --judge-url (e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1)")
    key_env = args.judge_key_env or DEFAULT_KEY_ENV
    key = os.environ.get(key_env)
    if args.judge_key_env and not key:
        raise ValueError(f"--judge-key-env {key_env}: that environment variable is not set")
    return lambda: HttpJudge(args.judge_url, args.judge_model, api_key=key, **limit)


def record_unreadable(items, broken: dict[str, str], out: Path) -> None:
    """Record the samples that cannot be edited in OUT/results.jsonl as failed items, as the batch runner
    records an item it cannot run, so that the log names them and a re-run tries them again."""
    from ..batch.results import ResultsLog

    log = ResultsLog(out)
    try:
        for item in items:
            if item.id in broken:
                log.record_error(item, broken[item.id])
    finally:
        log.close([item.id for item in items])


def official_model_name(out: Path) -> str:
    """The official scripts' --model_name: the results folder's name (they read SAVE_PATH/MODEL/fullset)."""
    return out.resolve().name or "model"


def run(args: argparse.Namespace) -> int:
    from ..batch.runner import run_batch
    from ..gedit.dataset import edit_items, load_gedit, write_sources
    from ..gedit.scoring import score_samples, scores_folder
    from ..gedit.stats import (AVERAGE, format_score, official_folder, statistics, write_official_csvs,
                               write_tables)

    samples = load_gedit(args.data, tuple(args.languages or ()), tuple(args.task_types or ()))
    make_judge = judge_factory(args) if args.stage in ("all", "score") else None
    incomplete = False
    if args.stage in ("all", "edit"):
        defaults, files = run_setup(args)
        items = edit_items(samples)
        broken = write_sources(samples, args.out)  # samples whose input_image cannot be read
        if broken:
            record_unreadable(items, broken, args.out)
        summary = run_batch([i for i in items if i.id not in broken], defaults, files, args.out, ray=args.ray,
                            workers=args.workers, progress=not args.quiet)
        failed = summary.errors + len(broken)
        incomplete |= failed > 0
        if not args.quiet:
            print(f"edits: {summary.ok} of {len(items)} ok, {failed} failed; see {args.out / 'results.jsonl'}")
        if summary.out_of_memory:  # no judge on top of a machine that cannot even edit
            return out_of_memory_status(PROG, summary.out_of_memory)
    if make_judge is None:
        return 1 if incomplete else 0
    gc.collect()  # the edit models are gone before a 72B judge loads
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    judge = make_judge()
    verdicts = score_samples(samples, args.out, judge, progress=not args.quiet)
    rows = statistics(samples, verdicts)
    folder = scores_folder(args.out, judge.name)
    csv_path, md_path = write_tables(rows, folder, judge.name)
    model = official_model_name(args.out)
    official = official_folder(folder, model, OFFICIAL_BACKBONES[args.judge])
    write_official_csvs(samples, verdicts, args.out, official, model)
    incomplete |= any(r.unscored for r in rows if r.task_type == AVERAGE)
    if not args.quiet:
        for r in (r for r in rows if r.task_type == AVERAGE):
            print(f"{r.language} {r.subset}: SC {format_score(r.SC)}  PQ {format_score(r.PQ)}  O {format_score(r.O)}"
                  f"  ({r.scored} scored, {r.unscored} not)")
        print(f"statistics: {md_path} and {csv_path.name}; per task type for the official "
              f"calculate_statistics.py: {official}")
    return 1 if incomplete else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.quiet)
    from ..gedit.judges import JudgeError

    return run_guarded(PROG, args.out, lambda: run(args), errors=(JudgeError,))


if __name__ == "__main__":
    sys.exit(main())
