"""What one manifest item will run with: its settings (the command line's, overridden by its columns),
its DiT file and version, and the record of those "settings used" that decides whether a finished
output can be kept when the run is repeated.

Planning needs no model, so a bad value (a seed that is not a number, an unknown version) is the
item's error before anything loads.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..commands.cli import finite_float, seed_value
from ..pipeline import EditSettings
from ..release_files import DIT_RELEASE, RELEASE_FILES
from ..reasoning.loop import DEFAULT_ROUNDS
from ..versions import Version
from .manifest import EditItem

__all__ = ["Plan", "RunDefaults", "asks_for_reasoning", "plan_item", "reasoning_mode"]

_DIT_FOLDER = next(f.folder for f in RELEASE_FILES if f.role == "dit")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


@dataclass(frozen=True)
class RunDefaults:
    """What the command line gives every item."""

    settings: EditSettings
    dit: Path  # the DiT of items that name no version
    version: str | None = None  # --version: None detects it from the file
    models_dir: Path | None = None  # where an item's `version` finds that version's DiT
    runtime: dict[str, Any] = field(default_factory=dict)  # dtype choices, recorded with the settings


@dataclass(frozen=True)
class Plan:
    """One item, ready to run. Travels to Ray workers as JSON (``to_json``) plus the image bytes."""

    item: EditItem
    settings: EditSettings
    dit: str
    version: str | None
    runtime: dict[str, Any] = field(default_factory=dict)

    def settings_used(self) -> dict[str, Any]:
        """Everything that shapes the output, as results.jsonl records it."""
        return {**asdict(self.settings), "version": self.version or "auto", "dit": Path(self.dit).name,
                **self.runtime}

    def to_json(self) -> str:
        item = self.item
        return json.dumps({"id": item.id, "image": item.image if isinstance(item.image, str) else None,
                           "instruction": item.instruction, "overrides": item.overrides,
                           "settings": asdict(self.settings), "dit": self.dit, "version": self.version,
                           "runtime": self.runtime})

    @classmethod
    def from_json(cls, text: str, image_bytes: bytes | None = None) -> Plan:
        data = json.loads(text)
        item = EditItem(data["id"], data["image"] if data["image"] is not None else image_bytes,
                        data["instruction"], data["overrides"])
        return cls(item, EditSettings(**data["settings"]), data["dit"], data["version"], data["runtime"])


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def _checked(parse, value: Any, name: str):
    try:
        return parse(str(value))
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"{name}: {err}") from None


def reasoning_mode(item: EditItem) -> dict[str, Any]:
    """Step1X-Edit v1.2's think (the MLLM rewrites the instruction first) and reflect (it judges the result
    and edits again) as settings changes: think true/false; reflect a number of rounds, or true for the
    reference's 3. An item whose DiT is not v1.2 then fails with the pipeline's message."""
    changes: dict[str, Any] = {}
    if "think" in item.overrides:
        changes["think"] = _flag(item.overrides["think"], "think")
    if "reflect" in item.overrides:
        value = item.overrides["reflect"]
        if isinstance(value, bool) or str(value).strip().lower() in _TRUE | _FALSE:
            changes["reflect"] = DEFAULT_ROUNDS if _flag(value, "reflect") else 0
        else:
            try:
                changes["reflect"] = _integer(value, "reflect")
            except ValueError:
                raise ValueError(f"reflect must be true, false or a number of rounds, got {value!r}") from None
    return changes


def asks_for_reasoning(items: list[EditItem]) -> bool:
    """Whether any item turns thinking or reflection on (the text encoder then keeps its LM head)."""
    for item in items:
        try:
            changes = reasoning_mode(item)
        except ValueError:
            continue  # planning records it as the item's error
        if changes.get("think") or changes.get("reflect"):
            return True
    return False


def _dit_for(version: str, defaults: RunDefaults) -> Path:
    """With a models folder, an item's version picks that version's released DiT; otherwise the one DiT
    given is run as that version (as --version does)."""
    if defaults.models_dir is None:
        return defaults.dit
    path = defaults.models_dir / _DIT_FOLDER / DIT_RELEASE[Version(version)]
    if not path.exists():
        raise ValueError(f"version {version} asked, but {path.name} is not in {defaults.models_dir / _DIT_FOLDER}; "
                         f"download it (step1x-edit-download --version {version}) or drop the item's version")
    return path


def plan_item(item: EditItem, defaults: RunDefaults) -> Plan:
    """The item's settings, DiT and version; raises ValueError naming the bad column."""
    o = item.overrides
    changes: dict[str, Any] = {}
    if "seed" in o:
        changes["seed"] = _checked(seed_value, _integer(o["seed"], "seed"), "seed")
    for column in ("steps", "size_level"):
        if column in o:
            changes[column] = _integer(o[column], column)
    if "cfg" in o:
        changes["cfg_scale"] = _checked(finite_float, o["cfg"], "cfg")
    if "negative" in o:
        if not isinstance(o["negative"], str):
            raise ValueError(f"negative must be text, got {o['negative']!r}")
        changes["negative"] = o["negative"]
    changes.update(reasoning_mode(item))
    settings = replace(defaults.settings, **changes)
    settings.validate()
    if "version" in o:
        version = Version.parse(str(o["version"]).strip()).value
        dit = _dit_for(version, defaults)
    else:
        version, dit = defaults.version, defaults.dit
    return Plan(item, settings, str(dit), version, dict(defaults.runtime))
