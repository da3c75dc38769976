"""The tensors a Qwen2.5-VL config describes, as an ``ExpectedTensors`` for the shared file check.

Folder and single file are both held against the model their config builds (on the meta device), under the
Hub's tensor names, with the config's layer counts and widths stated so that a config that disagrees with its
weights is named as such (a config with fewer layers would otherwise silently drop the rest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..formats.expected import BlockCount, ExpectedTensors, NamedSize, module_shapes
from ..formats.safetensors_file import ModelFileError, read_header
from .names import hub_name

__all__ = ["header_tensors", "qwen_expected"]

_SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant")


def qwen_expected(model: nn.Module, config: Any, source: str, fix: str) -> ExpectedTensors:
    """What weights must hold for ``model`` (built from ``config``; ``source`` says where the config came from,
    e.g. "config.json")."""
    text = getattr(config, "text_config", config)
    vision = config.vision_config
    return ExpectedTensors(
        model=f"the Qwen2.5-VL that {source} describes",
        shapes=module_shapes(model, hub_name),
        fix=fix,
        # The LM head is never loaded (only hidden states are read); fp8 scales belong to their weights.
        ignored=lambda name: name.startswith("lm_head.") or name.endswith(_SCALE_SUFFIXES) or name == "scaled_fp8",
        sizes=(NamedSize("hidden_size", text.hidden_size, "model.embed_tokens.weight", 1, source),
               NamedSize("intermediate_size", text.intermediate_size, "model.layers.0.mlp.gate_proj.weight", 0,
                         source),
               NamedSize("vision hidden_size", vision.hidden_size, "visual.patch_embed.proj.weight", 0, source)),
        blocks=(BlockCount("model.layers", text.num_hidden_layers, "decoder layers", f"num_hidden_layers in {source}"),
                BlockCount("visual.blocks", vision.depth, "vision blocks", f"vision_config.depth in {source}")),
    )


def header_tensors(files: list[Path], error: type[ModelFileError]
                   ) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes and dtypes, under Hub names, of every tensor in ``files`` (one file or a folder's shards)."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for path in files:
        header = read_header(path, error)
        for key, shape in header.shapes.items():
            shapes[hub_name(key)] = shape
            dtypes[hub_name(key)] = header.dtypes[key]
    return shapes, dtypes
