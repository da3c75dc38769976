"""The batch manifest: which image to edit with which instruction, one item per line or row.

Three formats, the same columns: JSON Lines (``.jsonl``), CSV (``.csv``) and a Hugging Face ``datasets``
table (a ``save_to_disk`` folder, or ``.parquet`` / ``.arrow`` files). Required: ``id``, ``image``,
``instruction``; optional: the per-item settings in ``OPTIONAL_COLUMNS``. A relative image path is taken
from the manifest's folder; a ``datasets`` image column may hold the image itself.

Structural problems (a line that is not JSON, a CSV row a stray quote breaks, a missing column, a
duplicate id or one that would leave OUT, no items at all) stop the run before any model loads; a bad
value in one item (a missing image, a seed that is not a number, an id that cannot be a file name) is that
item's error, recorded before the models load or when it runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = ["EditItem", "ManifestError", "OPTIONAL_COLUMNS", "REQUIRED_COLUMNS", "check_item_id", "file_name_problem",
           "load_hf_table", "read_manifest", "short_id"]

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("id", "image", "instruction")
# Per-item settings; anything not given comes from the command line. think/reflect belong to Step1X-Edit
# v1.2's reasoning mode, accepted here so manifests written for it read (see plan.reasoning_mode).
OPTIONAL_COLUMNS = ("seed", "negative", "size_level", "steps", "cfg", "version", "think", "reflect")
# Names that a results folder uses itself.
_RESERVED_IDS = {"results"}
# What a file name cannot hold or be on Windows (and so on a share or a copy made there); checked per item.
_NOT_IN_NAMES = re.compile(r'[\\\x00-\x1f\x7f:*?"<>|]')
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{n}" for n in range(1, 10)), *(f"LPT{n}" for n in range(1, 10))}
NAME_MAX_BYTES = 255  # a file name's longest on common file systems (ext4, APFS, NTFS: 255 units)
# The PNG is first written as .<id>.png.<pid>.<8 hex>.tmp beside it (outputs.write_atomically): 22 more bytes.
OUTPUT_NAME_MAX_BYTES = NAME_MAX_BYTES - len(".") - len(".4194304.0123abcd.tmp")
OUTPUT_SUFFIX = ".png"


class ManifestError(ValueError):
    """The manifest cannot be used as a whole; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class EditItem:
    """One edit: ``image`` is a path (str) or the encoded image file itself (bytes)."""

    id: str
    image: str | bytes
    instruction: str
    overrides: dict[str, Any] = field(default_factory=dict)  # the optional columns this item sets

    @property
    def image_label(self) -> str:
        """How results.jsonl names the input: its path, or the digest of an image held in the manifest."""
        if isinstance(self.image, str):
            return self.image
        return f"<image in the manifest, sha256 {hashlib.sha256(self.image).hexdigest()[:16]}>"


def check_item_id(item_id: str, where: str) -> str:
    """An id is the output's path below OUT without .png: folders with '/', nothing that leaves OUT.
    Whether each part can be a file name is the item's own check (``file_name_problem``)."""
    parts = item_id.split("/")
    problem = None
    if not item_id.strip():
        problem = "is empty"
    elif item_id in _RESERVED_IDS:
        problem = "is reserved (OUT/results.jsonl is the run's record)"
    elif any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        problem = "must be a relative path of plain names ('a/b' is fine; no '..', no empty or hidden parts)"
    if problem:
        raise ManifestError(f"{where}: id {item_id!r} {problem}")
    return item_id


def short_id(item_id: str, limit: int = 60) -> str:
    """The id as an error message quotes it: whole, or its start and length when it is very long."""
    return repr(item_id) if len(item_id) <= limit else f"{item_id[:limit]!r}... ({len(item_id)} characters)"


def file_name_problem(item_id: str) -> str | None:
    """Why OUT/<id>.png cannot be a file (on this system or on Windows), or None when it can."""
    parts = item_id.split("/")
    for number, part in enumerate(parts, 1):
        name = part + OUTPUT_SUFFIX if number == len(parts) else part
        what = "the id" if len(parts) == 1 else f"the id's part {part[:60]!r}"
        limit = OUTPUT_NAME_MAX_BYTES if number == len(parts) else NAME_MAX_BYTES
        if len(name.encode("utf-8")) > limit:
            return (f"{what} makes a file name of {len(name.encode('utf-8'))} bytes ({name[-20:]!r} at its end); "
                    f"at most {limit} fit" + (f" (file names hold {NAME_MAX_BYTES}, and the PNG is first written "
                                              "under a longer temporary name)" if number == len(parts) else "")
                    + ": shorten the id")
        if _NOT_IN_NAMES.search(part):
            return (f"{what} holds a character file names cannot (\\ : * ? \" < > | or a control character); "
                    "use '/' for sub-folders and replace the others")
        if part != part.strip() or part.endswith("."):
            return f"{what} begins or ends with a space, or ends with a dot, which Windows drops from file names"
        if part.split(".")[0].strip().upper() in _WINDOWS_DEVICES:
            return f"{what} is a device name on Windows ({part.split('.')[0].upper()}), not a file name: rename it"
    return None


def _text(value: Any, column: str, where: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and column == "id":
        return str(value)
    if not isinstance(value, str):
        raise ManifestError(f"{where}: {column} must be text, got {type(value).__name__} {value!r}")
    return value


def _item(row: dict[str, Any], where: str, folder: Path) -> EditItem:
    missing = [c for c in REQUIRED_COLUMNS if row.get(c) in (None, "")]
    if missing:
        raise ManifestError(f"{where}: missing {', '.join(missing)} (every item needs {', '.join(REQUIRED_COLUMNS)})")
    image = row["image"]
    if isinstance(image, dict) and image.get("bytes"):  # a datasets Image column read without decoding
        image = image["bytes"]
    elif isinstance(image, dict) and image.get("path"):
        image = image["path"]
    if not isinstance(image, (bytes, bytearray)):
        image = _text(image, "image", where)
        if not Path(image).expanduser().is_absolute():
            image = str(folder / image)
    overrides = {c: row[c] for c in OPTIONAL_COLUMNS if row.get(c) not in (None, "")}
    item_id = check_item_id(_text(row["id"], "id", where), where)
    return EditItem(item_id, bytes(image) if isinstance(image, bytearray) else image,
                    _text(row["instruction"], "instruction", where), overrides)


def _json_lines(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{where}: not valid JSON ({err.msg}); each line must be one JSON object "
                                    '{"id": ..., "image": ..., "instruction": ...}') from None
            if not isinstance(row, dict):
                raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _csv_rows(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    """Rows read strictly: every row has the header's columns and fits on its own line, so a stray quote
    (``make it 12" tall`` typed as ``"12" tall``, or a quote left open) is named instead of silently
    swallowing the rows after it."""
    fix = ('put a field that holds a quote in quotes and double the quote inside it ("make it 12"" tall"), '
           "or use JSON Lines")
    previous_limit = csv.field_size_limit()
    # A field can be as long as the file: no "field larger than field limit" for a long instruction.
    csv.field_size_limit(max(previous_limit, min(path.stat().st_size + 1, 2**31 - 1)))
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, strict=True)
            header: list[str] | None = None
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:
                    if "unexpected end of data" in str(err):
                        raise ManifestError(f"{path.name} line {start}: a quoted field starts on this line and is never "
                                            f"closed: it takes every line after it (to line {reader.line_num}); a stray "
                                            f"quote? {fix}") from None
                    raise ManifestError(f"{path.name} line {start}: the row starting here cannot be read as CSV "
                                        f"({err}, by line {reader.line_num}); a stray quote? {fix}") from None
                if reader.line_num != start:
                    raise ManifestError(f"{path.name} line {start}: a quoted field starts on this line and runs on to "
                                        f"line {reader.line_num}, taking the rows between into it; a stray or "
                                        f"unclosed quote? {fix}. (A field cannot span lines here; for an "
                                        "instruction over several lines use JSON Lines and \\n)")
                if not row:
                    continue  # a blank line
                if header is None:
                    header = row
                    missing = [c for c in REQUIRED_COLUMNS if c not in header]
                    if missing:
                        raise ManifestError(f"{path.name}: the header lacks {', '.join(missing)} (found "
                                            f"{', '.join(header) or 'no header'})")
                    continue
                if len(row) != len(header):
                    raise ManifestError(f"{path.name} line {start}: {len(row)} fields, but the header has "
                                        f"{len(header)} ({', '.join(header)}); an unquoted comma or quote? Put such "
                                        "a field in quotes, and leave empty fields for the columns an item does not "
                                        "set (a,b.png,x,,)")
                yield f"{path.name} line {start}", dict(zip(header, row))
    finally:
        csv.field_size_limit(previous_limit)


def load_hf_table(path: Path):
    """A ``datasets.Dataset`` from a local copy: a ``save_to_disk`` folder (a DatasetDict gives its
    'train' split, or its only split), or .parquet / .arrow files (one file or a folder of them)."""
    try:
        import datasets
    except ImportError:
        raise ManifestError(f"{path} is a Hugging Face datasets table; reading it needs the datasets package: "
                            'pip install datasets (or pip install "step1x-edit[gedit]")') from None
    if path.is_dir() and any((path / n).is_file() for n in ("dataset_dict.json", "state.json")):
        table = datasets.load_from_disk(str(path))
    else:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".arrow"))
        kinds = {p.suffix for p in files}
        if not files or len(kinds) != 1 or not kinds <= {".parquet", ".arrow"}:
            raise ManifestError(f"{path}: no datasets table found; expected a save_to_disk folder or .parquet / "
                                ".arrow files (all of one kind)")
        table = datasets.load_dataset(kinds.pop()[1:], data_files=[str(p) for p in files], split="train")
    if isinstance(table, datasets.DatasetDict):
        split = "train" if "train" in table else next(iter(table)) if len(table) == 1 else None
        if split is None:
            raise ManifestError(f"{path} holds the splits {', '.join(table)}; point at one split's folder")
        table = table[split]
    # Images stay encoded: they travel to workers as file bytes and are decoded where they are edited.
    for name, feature in table.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            table = table.cast_column(name, datasets.Image(decode=False))
    return table


def _hf_rows(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    table = load_hf_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"{path.name}: the table lacks the column(s) {', '.join(missing)} (found "
                            f"{', '.join(table.column_names)})")
    for number, row in enumerate(table):
        yield f"{path.name} row {number}", row


def read_manifest(path: str | Path) -> list[EditItem]:
    """Every item of the manifest, in order; raises ManifestError for a manifest that cannot be used."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}")
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = _json_lines(path)
    elif path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    elif path.is_dir() or path.suffix.lower() in (".parquet", ".arrow"):
        rows = _hf_rows(path)
    else:
        raise ManifestError(f"{path}: unknown manifest format; use .jsonl (one JSON object a line), .csv, or a "
                            "Hugging Face datasets folder / .parquet file")
    items: list[EditItem] = []
    seen: dict[str, str] = {}
    unused: set[str] = set()
    folder = path.parent if path.is_file() else path
    for where, row in rows:
        item = _item(row, where, folder)
        if item.id in seen:
            raise ManifestError(f"{where}: id {item.id!r} already used at {seen[item.id]}; ids name the outputs, "
                                "so each must be unique")
        seen[item.id] = where
        unused |= set(row) - set(REQUIRED_COLUMNS) - set(OPTIONAL_COLUMNS)
        items.append(item)
    if not items:
        raise ManifestError(f"{path}: the manifest is empty (no items); each item needs "
                            f"{', '.join(REQUIRED_COLUMNS)}")
    if unused:
        logger.warning("manifest column(s) %s are not used (known: %s)", ", ".join(sorted(unused)),
                       ", ".join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS))
    return items

