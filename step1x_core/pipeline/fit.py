"""Whether the parts fit each other: the text encoder's hidden width against the width the DiT's connector reads,
and an encoded prompt's format against the DiT's version.

Each file can be fine on its own and still not fit the other (a Qwen2.5-VL-3B folder with the 7B's connector),
which would only show deep in sampling as a matrix-shape error. The width is read from headers alone, so
the check runs as soon as both files are known, before either is built.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..formats.safetensors_file import ModelFileError, read_header
from ..versions import Version

__all__ = ["IncompatibleModelsError", "check_encoder_width", "encoder_width", "format_problem", "width_problem"]

# Hidden widths of the published Qwen2.5-VL sizes, to name what was found.
KNOWN_WIDTHS = {2048: "Qwen2.5-VL-3B-Instruct", 3584: "Qwen2.5-VL-7B-Instruct", 5120: "Qwen2.5-VL-32B-Instruct",
                8192: "Qwen2.5-VL-72B-Instruct"}


class IncompatibleModelsError(ValueError):
    """Two model files that each load but do not fit together; the message names both widths and the fix."""


def _described(width: int) -> str:
    return f"{width} wide, as {KNOWN_WIDTHS[width]}" if width in KNOWN_WIDTHS else f"{width} wide"


def check_encoder_width(encoder_width: int | None, connector_width: int, encoder: str = "the text encoder",
                        dit: str = "the DiT") -> None:
    """Refuse an encoder whose hidden states the connector cannot read (None: not known yet, nothing to say)."""
    if encoder_width is None or encoder_width == connector_width:
        return
    raise IncompatibleModelsError(
        f"{encoder} does not fit {dit}: its hidden states are {_described(encoder_width)}, but the DiT's connector "
        f"reads {_described(connector_width)} hidden states. Fix: use the text encoder the DiT was trained with "
        f"({KNOWN_WIDTHS.get(connector_width, 'Qwen2.5-VL-7B-Instruct')}: the Hugging Face folder or ComfyUI's "
        "qwen_2.5_vl_7b*.safetensors)")


def encoder_width(path: str | Path) -> int | None:
    """The hidden width of the Qwen2.5-VL at ``path``, from its token embedding's header (a single file, or the
    folder's weights: a config.json that disagrees with them is the folder check's business), or None when it
    cannot be told cheaply (the loader then says what is wrong with the files)."""
    path = Path(path).expanduser()
    try:
        files = _weight_files(path) if path.is_dir() else [path]
        for file in files:
            embedding = next((s for n, s in read_header(file).shapes.items()
                              if n.endswith("embed_tokens.weight") and len(s) == 2), None)
            if embedding:
                return embedding[1]
    except (OSError, ValueError, AttributeError, ModelFileError):
        return None
    return None


def _weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors weights, the shard holding the embedding first when an index names it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        first = [name for key, name in weight_map.items() if key.endswith("embed_tokens.weight")]
        return [folder / name for name in dict.fromkeys(first + sorted(set(weight_map.values())))]
    return [folder / "model.safetensors"]


def width_problem(width: int | None, connector_width: int) -> str | None:
    """Why embeddings ``width`` wide (None: no tensor) cannot feed a connector that reads ``connector_width``."""
    if width == connector_width:
        return None
    found = "no tensor" if width is None else f"width {width}"
    return (f"its Qwen-VL embeddings have {found}, but this model's connector takes {connector_width}-wide "
            "Qwen2.5-VL-7B hidden states (a different encoder, e.g. Qwen2.5-VL-3B, was loaded)")


def format_problem(version: Version, v12_format: bool) -> str | None:
    """Why a prompt encoded in v1.2's format (or not) cannot drive a DiT of ``version``."""
    if version.reasoning_prompts == v12_format:
        return None
    return f"this is a {version} model, but the conditioning was encoded in another version's prompt format"


def prompt_format_of(version: Version) -> str:
    """The prompt format's name as users pick it."""
    return "v1.2" if version.reasoning_prompts else "v1.0 / v1.1"
