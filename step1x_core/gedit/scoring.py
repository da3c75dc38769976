"""Score every edited GEdit-Bench sample with a judge, resumably.

Verdicts go to ``OUT/viescore/<judge>/scores.jsonl`` as they come, one line per sample, with a digest of
the edited PNG they judged. A re-run asks the judge only about samples with no verdict yet, a verdict
for a different image (the edit was redone), or an error (a judge that was busy or down); a parse
failure is a verdict and stays. A sample whose edit is missing is left out and counted as not scored.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

from PIL import Image

from ..batch.journal import Journal
from .dataset import GEditSample
from .judges import JudgeError, JudgeUnavailable
from .viescore import Judge, score_edit

__all__ = ["SCORES_FILE", "score_samples", "scores_folder"]

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.jsonl"
SETTLED = ("ok", "parse_failure")


def scores_folder(out: Path, judge_name: str) -> Path:
    return out / "viescore" / re.sub(r"[^A-Za-z0-9._-]+", "_", judge_name)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def score_samples(samples: list[GEditSample], out: str | Path, judge: Judge,
                  progress: bool = True) -> dict[str, dict[str, Any]]:
    """Every sample's latest verdict (by item id); raises JudgeUnavailable when the judge cannot answer."""
    from tqdm import tqdm

    out = Path(out)
    journal = Journal(scores_folder(out, judge.name) / SCORES_FILE)
    todo = []
    for sample in samples:
        edited = sample.edited_path(out)
        if not edited.is_file() or not sample.source_path(out).is_file():
            continue
        previous = journal.records.get(sample.item_id)
        digest = _digest(edited)
        if previous and previous.get("status") in SETTLED and previous.get("edited_sha256") == digest:
            continue
        todo.append((sample, digest))
    missing = sum(not s.edited_path(out).is_file() for s in samples)
    if missing:
        logger.warning("%d of %d samples have no edit yet; they are not scored", missing, len(samples))
    try:
        for sample, digest in tqdm(todo, desc="judging", unit="edit", disable=not progress or not todo):
            record = {"id": sample.item_id, "task_type": sample.task_type, "key": sample.key,
                      "language": sample.language, "intersection": sample.intersection,
                      "instruction": sample.instruction, "edited_sha256": digest, "judge": judge.name}
            try:
                verdict = score_edit(judge, _open(sample.source_path(out)), _open(sample.edited_path(out)),
                                     sample.instruction)
                record.update(verdict.to_dict(), error=None)
            except JudgeUnavailable:
                raise
            except JudgeError as err:
                logger.warning("%s: %s", sample.item_id, err)
                record.update(status="error", error=str(err))
            journal.append(record)
    finally:
        journal.close([s.item_id for s in samples])
    return journal.records
