"""The config.json of a diffusers ``Step1XEditTransformer2DModel``: what its keys cannot tell, and a check
that it agrees with the weights.

The head count (hence the RoPE split) of the DiT and of the connector are not in any tensor shape. The
released models use 128-wide heads, which the loader assumes without a config; a config (the diffusers
``transformer/config.json``, or the same JSON under the "config" key of a file's metadata) states them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLASS_NAME = "Step1XEditTransformer2DModel"
METADATA_KEY = "config"  # a single file may carry its diffusers config here (the downloader's merged file does)


@dataclass(frozen=True)
class ShapeFreeFacts:
    """The hyperparameters a config gives and the weights do not."""

    num_heads: int
    axes_dim: tuple[int, ...]
    connector_heads: int


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable JSON config ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return config


def config_from_metadata(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The diffusers config a file's metadata carries, if it carries one for this model."""
    try:
        config = json.loads(metadata.get(METADATA_KEY, ""))
    except json.JSONDecodeError:
        return None
    return config if isinstance(config, dict) and config.get("_class_name") == CLASS_NAME else None


def shape_free_facts(config: dict[str, Any]) -> ShapeFreeFacts:
    try:
        return ShapeFreeFacts(int(config["num_attention_heads"]), tuple(int(a) for a in config["axes_dims_rope"]),
                              int(config["connector_heads_num"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the {CLASS_NAME} config lacks or garbles {err}") from err


def disagreements(config: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """'name: config says X, the weights say Y' for every config field the weights contradict. ``found``
    maps config field names to what the weights show."""
    return [f"{name}: config.json says {config[name]!r}, the weights have {value!r}"
            for name, value in found.items() if name in config and config[name] is not None and config[name] != value]
