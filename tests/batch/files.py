"""What the batch tests write and read: manifests beside the test image, and the run's results.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tests.golden import REPO_ROOT

CAT = REPO_ROOT / "tests" / "data" / "cat.png"


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    """``folder``/edits.jsonl with ``rows``, beside cat.png and a mirrored cat.jpg the rows may name."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.open(CAT).save(folder / "cat.png")
    Image.open(CAT).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "cat.jpg", quality=90)
    path = folder / "edits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cat_manifest(folder: Path, ids: list[str]) -> Path:
    """One "add a hat" edit of cat.png per id."""
    return write_manifest(folder, [{"id": i, "image": "cat.png", "instruction": "add a hat"} for i in ids])


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def read_results(out: Path) -> dict[str, dict]:
    """Each id's latest record."""
    return {r["id"]: r for r in read_records(out)}
