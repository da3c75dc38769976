"""GEdit-Bench (``stepfun-ai/GEdit-Bench``) from a local copy, and the official output layout.

The table has one row per (sample, language): ``task_type`` (11 kinds), ``key``, ``instruction``,
``instruction_language`` (``en`` or ``cn``), ``input_image`` (the image the judge compares against),
``input_image_raw`` (the original, which is edited) and ``Intersection_exist`` (whether the sample is in
the intersection subset). Results go where the official scoring code looks for them:
``OUT/fullset/<task_type>/<language>/<key>.png`` and ``<key>_SRCIMG.png`` beside it.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..batch.manifest import EditItem, ManifestError, check_item_id, load_hf_table
from ..images.writing import save_png_atomically

__all__ = ["COLUMNS", "GEditSample", "LANGUAGES", "TASK_TYPES", "edit_items", "load_gedit", "write_sources"]

logger = logging.getLogger(__name__)

TASK_TYPES = ("background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
              "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer")
LANGUAGES = ("en", "cn")
COLUMNS = ("task_type", "key", "instruction", "instruction_language", "input_image", "input_image_raw",
           "Intersection_exist")
SUBSET = "fullset"


@dataclass(frozen=True)
class GEditSample:
    task_type: str
    key: str
    instruction: str
    language: str
    input_image: bytes  # encoded image files, as the table holds them
    input_image_raw: bytes
    intersection: bool

    @property
    def item_id(self) -> str:
        """The batch id, which is also the official path of the edit below OUT (without .png)."""
        return f"{SUBSET}/{self.task_type}/{self.language}/{self.key}"

    def edited_path(self, out: Path) -> Path:
        return out / f"{self.item_id}.png"

    def source_path(self, out: Path) -> Path:
        return out / f"{self.item_id}_SRCIMG.png"


def _image_bytes(value, column: str, where: str) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and Path(value["path"]).is_file():
            return Path(value["path"]).read_bytes()
    raise ManifestError(f"{where}: {column} holds no image")


def load_gedit(path: str | Path, languages: tuple[str, ...] | None = None,
               task_types: tuple[str, ...] | None = None) -> list[GEditSample]:
    """The samples of a local GEdit-Bench copy (a ``save_to_disk`` folder, or its .parquet / .arrow files),
    optionally only some languages or task types."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"GEdit-Bench not found at {path}; download it once (e.g. `huggingface-cli download "
                            "stepfun-ai/GEdit-Bench --repo-type dataset --local-dir DIR`) and pass that folder")
    table = load_hf_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"{path} is not GEdit-Bench: it lacks the column(s) {', '.join(missing)} "
                            f"(found {', '.join(table.column_names)})")
    samples = []
    for number, row in enumerate(table):
        if languages and row["instruction_language"] not in languages:
            continue
        if task_types and row["task_type"] not in task_types:
            continue
        where = f"{path.name} row {number}"
        sample = GEditSample(row["task_type"], str(row["key"]), row["instruction"], row["instruction_language"],
                             _image_bytes(row["input_image"], "input_image", where),
                             _image_bytes(row["input_image_raw"], "input_image_raw", where),
                             bool(row["Intersection_exist"]))
        check_item_id(sample.item_id, where)  # keys and task types become folder and file names
        samples.append(sample)
    unknown = sorted({s.task_type for s in samples} - set(TASK_TYPES))
    if unknown:
        logger.warning("task types beyond GEdit-Bench's 11: %s (scored like the others)", ", ".join(unknown))
    if not samples:
        raise ManifestError(f"{path}: no sample left after choosing languages {languages} and task types "
                            f"{task_types}")
    return samples


def write_sources(samples: list[GEditSample], out: Path) -> dict[str, str]:
    """``<key>_SRCIMG.png``: the dataset's ``input_image`` as PNG, as the official example writes it (the
    judge compares the edit with it). Existing files are kept. A sample whose ``input_image`` Pillow
    cannot read is named in a warning and skipped; returns those samples' errors by item id."""
    broken = {}
    for sample in samples:
        path = sample.source_path(out)
        if path.is_file():
            continue
        try:
            with Image.open(io.BytesIO(sample.input_image)) as image:
                image.load()
                decoded = image.copy()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            reason = ("is not an image Pillow can read" if isinstance(err, UnidentifiedImageError)
                      else f"cannot be read: {err}")
            broken[sample.item_id] = (f"GEdit-Bench sample {sample.key} ({sample.task_type}, {sample.language}): "
                                      f"its input_image {reason}")
            logger.warning("%s; it is not edited", broken[sample.item_id])
            continue
        save_png_atomically(decoded, path)
    return broken


def edit_items(samples: list[GEditSample]) -> list[EditItem]:
    """The batch items: edit ``input_image_raw`` (as the official example does) with each instruction."""
    return [EditItem(s.item_id, s.input_image_raw, s.instruction) for s in samples]
