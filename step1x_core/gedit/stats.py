"""GEdit-Bench statistics, aggregated as the official ``calculate_statistics.py`` does.

Per language and task type: the mean of SC, of PQ and of O over the samples (O is each sample's
sqrt(SC * PQ), then averaged); the same over the intersection subset (``Intersection_exist``); and an
average row that is the plain mean of the task types' means (each task type weighs the same, whatever
its number of samples; one with no scored sample is left out). Samples without a verdict (parse
failure, judge error, no edit) are left out of the means and counted in ``unscored``. The scored
samples are also written as the official per-task-type ``<model>_<task_type>_gpt_score.csv`` files, so
that the official script can compute the same table from them.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..images.writing import write_atomically
from .dataset import LANGUAGES, TASK_TYPES, GEditSample

__all__ = ["AVERAGE", "OFFICIAL_COLUMNS", "SUBSETS", "Row", "format_score", "official_folder", "statistics",
           "write_official_csvs", "write_tables"]

SUBSETS = ("fullset", "intersection")
AVERAGE = "average"
SCORES = ("SC", "PQ", "O")
# The columns of the official per-task-type files ``<model>_<task_type>_gpt_score.csv`` that
# ``calculate_statistics.py`` reads (its spelling "sementics").
OFFICIAL_COLUMNS = ("source_image", "edited_image", "instruction", "sementics_score", "quality_score",
                    "intersection_exist", "instruction_language")


@dataclass(frozen=True)
class Row:
    language: str
    subset: str
    task_type: str  # or "average"
    scored: int
    unscored: int
    SC: float
    PQ: float
    O: float  # noqa: E741 - the paper's name


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _ordered(values: set[str], preferred: tuple[str, ...]) -> list[str]:
    return [v for v in preferred if v in values] + sorted(values - set(preferred))


def statistics(samples: list[GEditSample], verdicts: dict[str, dict[str, Any]]) -> list[Row]:
    """The table's rows: for each language and subset, one row per task type, then the average."""
    rows = []
    for language in _ordered({s.language for s in samples}, LANGUAGES):
        for subset in SUBSETS:
            chosen = [s for s in samples if s.language == language and (subset == "fullset" or s.intersection)]
            per_task = []
            for task_type in _ordered({s.task_type for s in chosen}, TASK_TYPES):
                cell = [s for s in chosen if s.task_type == task_type]
                ok = [verdicts[s.item_id] for s in cell
                      if verdicts.get(s.item_id, {}).get("status") == "ok"]
                per_task.append(Row(language, subset, task_type, len(ok), len(cell) - len(ok),
                                    *(_mean([v[k] for v in ok]) for k in SCORES)))
            if not per_task:
                continue
            scored = [r for r in per_task if r.scored]
            rows += per_task
            rows.append(Row(language, subset, AVERAGE, sum(r.scored for r in per_task),
                            sum(r.unscored for r in per_task),
                            *(_mean([getattr(r, k) for r in scored]) for k in SCORES)))
    return rows


def _csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(Row)], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(row).items()})
    return buffer.getvalue()


def format_score(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def _markdown(rows: list[Row], judge: str) -> str:
    lines = [f"# GEdit-Bench VIEScore (judge: {judge})", "",
             "SC: semantic consistency, PQ: perceptual quality, O: overall (mean of each sample's sqrt(SC·PQ)); "
             "0 to 10. The average row is the mean over task types."]
    for language in dict.fromkeys(r.language for r in rows):
        for subset in SUBSETS:
            block = [r for r in rows if r.language == language and r.subset == subset]
            if not block:
                continue
            title = "full set" if subset == "fullset" else "intersection subset"
            lines += ["", f"## {language}, {title}", "", "| task type | scored | not scored | SC | PQ | O |",
                      "|---|---:|---:|---:|---:|---:|"]
            for r in block:
                name = f"**{r.task_type}**" if r.task_type == AVERAGE else r.task_type
                lines.append(f"| {name} | {r.scored} | {r.unscored} | {format_score(r.SC)} | {format_score(r.PQ)} | "
                             f"{format_score(r.O)} |")
    return "\n".join(lines) + "\n"


def write_tables(rows: list[Row], folder: Path, judge: str) -> tuple[Path, Path]:
    """statistics.csv (every number) and statistics.md (three decimals, as the official printout)."""
    csv_path, md_path = folder / "statistics.csv", folder / "statistics.md"
    for path, text in ((csv_path, _csv(rows)), (md_path, _markdown(rows, judge))):
        write_atomically(path, lambda f, text=text: f.write(text.encode("utf-8")))
    return csv_path, md_path


def official_folder(scores_dir: Path, model: str, backbone: str) -> Path:
    """Where ``calculate_statistics.py --save_path SCORES_DIR --model_name MODEL --backbone BACKBONE`` looks
    for the per-task-type files: SCORES_DIR/MODEL/BACKBONE/eval_results_new."""
    return scores_dir / model / backbone / "eval_results_new"


def write_official_csvs(samples: list[GEditSample], verdicts: dict[str, dict[str, Any]], out: Path,
                        folder: Path, model: str) -> list[Path]:
    """``<model>_<task_type>_gpt_score.csv`` in ``folder``, one per task type (all 11 of GEdit-Bench, as the
    official script opens each; a task type without a scored sample gets the header only), in the layout
    of the official scoring script: one row per scored sample (status "ok"; parse failures, judge errors
    and missing edits are left out, as in our table), both languages together (``instruction_language``
    as the data spells it: en, cn). ``out`` is the results folder the image paths are given under."""
    chosen = {s.task_type for s in samples} | set(TASK_TYPES)
    paths = []
    for task_type in _ordered(chosen, TASK_TYPES):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=OFFICIAL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for sample in samples:
            verdict = verdicts.get(sample.item_id, {})
            if sample.task_type != task_type or verdict.get("status") != "ok":
                continue
            writer.writerow({"source_image": str(sample.source_path(out)), "edited_image": str(sample.edited_path(out)),
                             "instruction": sample.instruction, "sementics_score": verdict["SC"],
                             "quality_score": verdict["PQ"], "intersection_exist": sample.intersection,
                             "instruction_language": sample.language})
        path = folder / f"{model}_{task_type}_gpt_score.csv"
        write_atomically(path, lambda f, text=buffer.getvalue(): f.write(text.encode("utf-8")))
        paths.append(path)
    return paths
