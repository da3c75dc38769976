"""OUT/results.jsonl and the outputs beside it: what is done, and the record of each item.

Each finished item appends one JSON line (flushed to disk at once), after its PNG was written
atomically, so a crash or Ctrl-C leaves whole PNGs and whole lines only. A re-run keeps an item whose
last line says ``ok``, whose PNG exists and whose recorded settings, instruction and image match what it
would run with now; everything else runs again. At the end of a run the file is rewritten with one line
per item (its latest), in manifest order.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from ..commands.cli import save_png_atomically, write_atomically
from .manifest import EditItem
from .plan import Plan
from .worker import Outcome

__all__ = ["RESULTS_FILE", "ResultsLog"]

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"


class ResultsLog:
    """The results of the runs into one output folder (the last record of an id is its state)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / RESULTS_FILE
        self.records: dict[str, dict[str, Any]] = self._read()
        self._file: IO[str] | None = None

    def _read(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return records
        with self.path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                    records[record["id"]] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    if line.strip():  # a line cut short by a crash: that item simply runs again
                        logger.warning("%s line %d is incomplete; ignoring it", self.path, number)
        return records

    def output_path(self, item_id: str) -> Path:
        return self.out_dir / f"{item_id}.png"

    def is_done(self, plan: Plan) -> bool:
        """Finished before with exactly these settings, and its output is still there."""
        record = self.records.get(plan.item.id)
        return (record is not None and record.get("status") == "ok"
                and record.get("settings") == plan.settings_used()
                and record.get("instruction") == plan.item.instruction
                and record.get("image") == plan.item.image_label
                and self.output_path(plan.item.id).is_file())

    def record_outcome(self, plan: Plan, outcome: Outcome) -> dict[str, Any]:
        """Save the edited image (atomically) and append the item's line."""
        output = None
        if outcome.image is not None:
            save_png_atomically(outcome.image, self.output_path(plan.item.id))
            output = f"{plan.item.id}.png"
        return self._append({
            "id": plan.item.id, "status": "ok" if outcome.error is None else "error", "output": output,
            "seed": plan.settings.seed, "settings": plan.settings_used(), "seconds": round(outcome.seconds, 3),
            "error": outcome.error, "instruction": plan.item.instruction, "image": plan.item.image_label,
        })

    def record_error(self, item: EditItem, error: str) -> dict[str, Any]:
        """An item that could not even be planned (a bad value in one of its columns)."""
        return self._append({"id": item.id, "status": "error", "output": None, "seed": None, "settings": None,
                             "seconds": 0.0, "error": error, "instruction": item.instruction,
                             "image": item.image_label})

    def _append(self, record: dict[str, Any]) -> dict[str, Any]:
        if self._file is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ends_cleanly = not self.path.exists() or self.path.stat().st_size == 0 or _last_byte(self.path) == b"\n"
            self._file = self.path.open("a", encoding="utf-8")
            if not ends_cleanly:
                self._file.write("\n")  # after a line cut short by a crash, start a fresh one
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records[record["id"]] = record
        return record

    def close(self, order: list[str]) -> None:
        """Rewrite the file with one line per item, manifest order first (atomically, like the PNGs)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.records:
            return
        ids = [i for i in order if i in self.records] + [i for i in self.records if i not in set(order)]
        lines = "".join(json.dumps(self.records[i], ensure_ascii=False) + "\n" for i in ids)
        write_atomically(self.path, lambda f: f.write(lines.encode("utf-8")))

    def summary(self, ids: list[str]) -> tuple[int, int]:
        """(ok, error) among these ids."""
        statuses = [self.records[i]["status"] for i in ids if i in self.records]
        return statuses.count("ok"), statuses.count("error")


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)
