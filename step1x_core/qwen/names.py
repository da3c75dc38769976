"""Qwen2.5-VL tensor names: the Hub's (transformers 4.49, ComfyUI's files), whatever transformers wrote them."""

from __future__ import annotations

__all__ = ["hub_name"]


def hub_name(name: str) -> str:
    """The Hub (transformers 4.49, ComfyUI) name of a tensor named by transformers >= 4.52."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual."):]
    return name
