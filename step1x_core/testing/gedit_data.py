"""A tiny GEdit-Bench in the real format, and a judge whose answers are written out in advance.

``write_tiny_gedit`` writes a ``datasets`` table with GEdit-Bench's columns and types (two Image
columns, a bool ``Intersection_exist``), laid out as ``save_to_disk`` writes it or as the Hub's
parquet files, with small synthetic images. ``ScriptedJudge`` answers VIEScore's questions with given
texts, so the parsing and the arithmetic can be checked against hand-computed values.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..gedit.dataset import LANGUAGES, TASK_TYPES

__all__ = ["ScriptedJudge", "write_tiny_gedit"]

_INSTRUCTIONS = {"en": "make the {} look different", "cn": "让{}看起来不一样"}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _picture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth colour gradient with noise: an image the VAE and Qwen can take, unlike a flat colour."""
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, 3)
    pixels = base + 80 * np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1)
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_tiny_gedit(path: str | Path, task_types: Sequence[str] = TASK_TYPES[:3],
                     languages: Sequence[str] = LANGUAGES, per_task: int = 2, layout: str = "save_to_disk",
                     seed: int = 0, unreadable: Sequence[int] = ()) -> Path:
    """Write ``per_task`` samples per task type, each in every language (same key, as GEdit-Bench pairs
    its English and Chinese instructions); every other sample is in the intersection subset.
    ``layout``: "save_to_disk" (a DatasetDict folder) or "parquet" (``data/train-*.parquet``).
    ``unreadable``: row numbers whose ``input_image`` holds bytes that are no image (a corrupt sample)."""
    import datasets

    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {name: [] for name in ("task_type", "key", "instruction", "instruction_language",
                                                       "input_image", "input_image_raw", "Intersection_exist")}
    for task_type in task_types:
        for index in range(per_task):
            raw = _picture(rng, int(rng.integers(40, 120)), int(rng.integers(40, 120)))
            shown = raw.resize((max(16, raw.width // 2), max(16, raw.height // 2)), Image.Resampling.BICUBIC)
            key = hashlib.sha1(f"{seed}/{task_type}/{index}".encode()).hexdigest()[:24]
            for language in languages:
                columns["task_type"].append(task_type)
                columns["key"].append(key)
                columns["instruction"].append(_INSTRUCTIONS.get(language, "{}").format(task_type))
                columns["instruction_language"].append(language)
                columns["input_image"].append({"bytes": _png(shown), "path": None})
                columns["input_image_raw"].append({"bytes": _png(raw), "path": None})
                columns["Intersection_exist"].append(index % 2 == 0)
    for row in unreadable:
        columns["input_image"][row] = {"bytes": b"this is not an image file", "path": None}
    features = datasets.Features({
        "task_type": datasets.Value("string"), "key": datasets.Value("string"),
        "instruction": datasets.Value("string"), "instruction_language": datasets.Value("string"),
        "input_image": datasets.Image(), "input_image_raw": datasets.Image(),
        "Intersection_exist": datasets.Value("bool")})
    table = datasets.Dataset.from_dict(columns, features=features)
    path = Path(path)
    if layout == "save_to_disk":
        datasets.DatasetDict({"train": table}).save_to_disk(str(path))
    elif layout == "parquet":
        (path / "data").mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(path / "data" / "train-00000-of-00001.parquet"))
    else:
        raise ValueError(f"layout must be 'save_to_disk' or 'parquet', got {layout!r}")
    return path


class ScriptedJudge:
    """Answers each question with ``answer(prompt, images)``; remembers what it was asked."""

    def __init__(self, answer: Callable[[str, list[Image.Image]], str], name: str = "scripted"):
        self.answer = answer
        self.name = name
        self.asked: list[tuple[str, list[tuple[int, int]]]] = []  # (prompt, image sizes)

    def ask(self, images: Sequence[Image.Image], prompt: str) -> str:
        self.asked.append((prompt, [image.size for image in images]))
        return self.answer(prompt, list(images))
