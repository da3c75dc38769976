"""A JSON Lines journal that survives crashes: one record per line, keyed by ``id``, the last one wins.

Appends are flushed to disk one line at a time, so a crash costs at most the line being written; a line
cut short is skipped when read (that item just runs again). ``close`` rewrites the file atomically with
one line per id in a given order. The batch's results.jsonl and GEdit's scores.jsonl are journals.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from ..images.writing import write_atomically

__all__ = ["Journal"]

logger = logging.getLogger(__name__)


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
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
                    if line.strip():
                        logger.warning("%s line %d is incomplete; ignoring it", self.path, number)
        return records

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            cut_short = self.path.exists() and self.path.stat().st_size > 0 and _last_byte(self.path) != b"\n"
            self._file = self.path.open("a", encoding="utf-8")
            if cut_short:
                self._file.write("\n")  # start a fresh line after one a crash cut short
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records[record["id"]] = record
        return record

    def close(self, order: list[str]) -> None:
        """Rewrite with one line per id: ``order`` first, then any others (from earlier runs)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.records:
            return
        known = set(order)
        ids = [i for i in order if i in self.records] + [i for i in self.records if i not in known]
        text = "".join(json.dumps(self.records[i], ensure_ascii=False) + "\n" for i in ids)
        write_atomically(self.path, lambda f: f.write(text.encode("utf-8")))


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)
