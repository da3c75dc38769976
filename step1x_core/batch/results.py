"""OUT/results.jsonl and the outputs beside it: what is done, and the record of each item.

Each finished item appends one JSON line (flushed to disk at once), after its PNG was written
atomically, so a crash or Ctrl-C leaves whole PNGs and whole lines only. Just before its PNG is renamed
into place a ``writing`` line names it, so a run killed between the PNG and its ``ok`` line leaves a PNG
the batch knows as its own (the next run edits that item again and may replace it). A re-run keeps an
item whose last line says ``ok``, whose PNG exists and whose recorded settings, instruction and image
match what it would run with now (the image's path and its content: ``image_file`` holds its size,
modification time and SHA-256); everything else runs again. At the end of a run the file is rewritten
with one line per item (its latest), in manifest order.

The batch replaces only PNGs it wrote itself: an item's line names its PNG in ``output`` (ok) or, once a
later run of the item failed, in ``earlier_output``; any other file at OUT/<id>.png is left alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..images.writing import save_png_atomically
from .journal import Journal
from .manifest import EditItem
from .plan import Plan
from .worker import OUT_OF_MEMORY_ITEM, Outcome

__all__ = ["RESULTS_FILE", "ResultsLog", "file_fingerprint"]

RESULTS_FILE = "results.jsonl"
WRITING = "writing"  # the status of an item whose PNG is being renamed into place


def file_fingerprint(path: str | Path, known: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The size, modification time and SHA-256 of an input image (None when it cannot be read). When
    ``known`` has the same size and time, its digest is taken as is (the file is not read again)."""
    try:
        stat = os.stat(Path(path).expanduser())
    except OSError:
        return None
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return dict(known)
    digest = hashlib.sha256()
    try:
        with open(Path(path).expanduser(), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


class ResultsLog:
    """The results of the runs into one output folder (the last record of an id is its state)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.journal = Journal(self.out_dir / RESULTS_FILE)
        self._inputs: dict[str, dict[str, Any] | None] = {}  # each image file's fingerprint when planned

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        return self.journal.records

    def output_path(self, item_id: str) -> Path:
        return self.out_dir / f"{item_id}.png"

    def is_done(self, plan: Plan) -> bool:
        """Finished before with exactly these settings and input image (path and content), and its output is
        still there."""
        record = self.records.get(plan.item.id)
        return (record is not None and record.get("status") == "ok"
                and record.get("settings") == plan.settings_used()
                and record.get("instruction") == plan.item.instruction
                and record.get("image") == plan.item.image_label
                and self._same_input(plan, record)
                and self.output_path(plan.item.id).is_file())

    def _same_input(self, plan: Plan, record: dict[str, Any]) -> bool:
        """An image file's content unchanged since its record. Kept when that cannot be told: a record from
        before fingerprints (or of a file unreadable then), or a file no longer there (editing it again
        could only fail)."""
        known = record.get("image_file")
        if not isinstance(plan.item.image, str) or not isinstance(known, dict):
            return True  # an image held in the manifest is named by its digest already
        now = file_fingerprint(plan.item.image, known)
        return now is None or now.get("sha256") == known.get("sha256")

    def note_input(self, plan: Plan) -> None:
        """Fingerprint the item's image file now, before it is edited: the record will say what was read (a
        file replaced during the edit then differs, and the next run edits the item again)."""
        if isinstance(plan.item.image, str):
            self._inputs[plan.item.id] = file_fingerprint(plan.item.image)

    def wrote(self, item_id: str) -> bool:
        """Whether OUT/<id>.png is this batch's own output (from an earlier run), so a run may replace it."""
        record = self.records.get(item_id) or {}
        return f"{item_id}.png" in (record.get("output"), record.get("earlier_output"))

    def _earlier(self, item_id: str) -> dict[str, Any]:
        """For a failed item: the PNG an earlier run wrote and left in place, still the batch's to replace."""
        return {"earlier_output": f"{item_id}.png"} if self.wrote(item_id) else {}

    def record_outcome(self, plan: Plan, outcome: Outcome) -> dict[str, Any]:
        """Save the edited image (atomically) and append the item's line."""
        output, earlier = None, {}
        record = {"id": plan.item.id, "seed": plan.settings.seed, "settings": plan.settings_used(),
                  "instruction": plan.item.instruction, "image": plan.item.image_label}
        if plan.item.id in self._inputs:
            record["image_file"] = self._inputs[plan.item.id]
        if outcome.image is not None:
            output = f"{plan.item.id}.png"
            self.journal.append({**record, "status": WRITING, "output": output, "error": None})
            save_png_atomically(outcome.image, self.output_path(plan.item.id))
        else:
            earlier = self._earlier(plan.item.id)
        return self.journal.append({
            **record, "status": "ok" if outcome.error is None else "error", "output": output,
            "seconds": round(outcome.seconds, 3), "error": outcome.error,
            **({"reasoning": outcome.reasoning} if outcome.reasoning is not None else {}), **earlier,
        })

    def record_error(self, item: EditItem, error: str) -> dict[str, Any]:
        """An item that could not even be planned (a bad value in one of its columns)."""
        return self.journal.append({"id": item.id, "status": "error", "output": None, "seed": None,
                                    "settings": None, "seconds": 0.0, "error": error,
                                    "instruction": item.instruction, "image": item.image_label,
                                    **self._earlier(item.id)})

    def close(self, order: list[str]) -> None:
        """One line per item, manifest order first (atomically, like the PNGs)."""
        self.journal.close(order)

    def summary(self, ids: list[str]) -> tuple[int, int]:
        """(ok, error) among these ids."""
        statuses = [self.records[i]["status"] for i in ids if i in self.records]
        return statuses.count("ok"), statuses.count("error")

    def out_of_memory(self, ids: list[str]) -> int:
        """How many of these ids failed because an allocation failed."""
        return sum(1 for i in ids if str((self.records.get(i) or {}).get("error") or "").startswith(OUT_OF_MEMORY_ITEM))
