"""Everything that differs between transformers versions, in one place.

Two kinds: which official run to reproduce (the official embedder's numbers depend on the transformers
version under it: ``OfficialBehaviour``), and how to reach the same piece of transformers across
4.49 to 5.x (import paths, argument names, where a method lives).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
import transformers
from packaging.version import Version

__all__ = ["AS_TRANSFORMERS_4_49", "AS_TRANSFORMERS_4_54", "AS_TRANSFORMERS_5_3", "OfficialBehaviour",
           "backbone", "behaviour_for_transformers", "dtype_kwarg", "image_token_types", "mrope_position_ids",
           "pil_image_processor_class", "pixel_limit_kwargs", "sequential_position_ids", "smart_resize",
           "vision_features", "vision_tower"]

TRANSFORMERS_VERSION = Version(transformers.__version__)


@dataclass(frozen=True)
class OfficialBehaviour:
    """The official embedder's numbers depend on the transformers version under it.

    - ``vision_id``: "Picture 1: " before the image. transformers <= 4.51 (the official pin is 4.49) drops
      the ``add_vision_id=True`` the official code passes to the processor's chat template; later
      versions forward it. This shifts what the fixed 217-token cut removes.
    - ``resize``: up to transformers 4.53 (and on any version without torchvision) the PIL image processor
      resizes ("pil"); from 4.54 on, with torchvision installed, the torchvision one is forced ("torch").
      They differ by +-1 on a few pixels.
    - ``positions``: up to transformers 5.2 Qwen2.5-VL's 3-D mRoPE positions are derived from the ids
      ("mrope"); from 5.3 on they need ``mm_token_type_ids``, which the official code does not pass, so
      the model silently falls back to plain sequential positions ("sequential").
    - ``bf16_buffer``: the official code writes the features into a bfloat16 buffer whatever the model
      dtype, so float32 runs come out rounded to bfloat16.
    """

    vision_id: bool
    resize: Literal["pil", "torch"]
    positions: Literal["mrope", "sequential"]
    bf16_buffer: bool = True


# The official requirements.txt pin (transformers 4.49.0); also 4.50-4.51.
AS_TRANSFORMERS_4_49 = OfficialBehaviour(vision_id=False, resize="pil", positions="mrope")
# transformers 4.54 to 5.2 with torchvision installed (which the official code imports anyway).
AS_TRANSFORMERS_4_54 = OfficialBehaviour(vision_id=True, resize="torch", positions="mrope")
# transformers 5.3 and later with torchvision: how the golden vectors in shared/golden were made.
AS_TRANSFORMERS_5_3 = OfficialBehaviour(vision_id=True, resize="torch", positions="sequential")


def behaviour_for_transformers(version: str) -> OfficialBehaviour:
    """What the official embedder does under a given transformers version (with torchvision)."""
    v = Version(version)
    if v < Version("4.52"):
        return AS_TRANSFORMERS_4_49
    if v < Version("4.54"):
        return dataclasses.replace(AS_TRANSFORMERS_4_49, vision_id=True)
    if v < Version("5.3"):
        return AS_TRANSFORMERS_4_54
    return AS_TRANSFORMERS_5_3


# --------------------------------------------------------------------------------------------------------
# Reaching the same piece of transformers on every version
# --------------------------------------------------------------------------------------------------------


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """How transformers' loaders take the dtype: ``dtype`` from 4.56 (``torch_dtype`` is deprecated there)."""
    return {"dtype": dtype} if TRANSFORMERS_VERSION >= Version("4.56") else {"torch_dtype": dtype}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule (multiples of ``factor``, pixel count within the limits)."""
    # transformers >= 5 keeps a torchvision-free copy in the PIL image-processor module; 4.x only has the
    # (PIL-based) slow image-processor module.
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as resize
    return resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def pil_image_processor_class() -> type:
    """The Qwen2-VL image processor that works on PIL/numpy (no torchvision)."""
    # transformers 5: the default Qwen2VLImageProcessor needs torchvision; the PIL backend is its own class.
    # transformers 4.x: the "slow" Qwen2VLImageProcessor is the PIL/numpy one.
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    return Qwen2VLImageProcessorPil


def pixel_limit_kwargs(min_pixels: int, max_pixels: int) -> dict[str, Any]:
    """Constructor arguments that set the image processor's pixel limits on this version."""
    # The constructor of every version takes min_pixels/max_pixels (4.49 resizes with them; 4.5x and 5.x
    # turn them into size). transformers 5 spells the limits as size={"shortest_edge", "longest_edge"}.
    limits: dict[str, Any] = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    if TRANSFORMERS_VERSION.major >= 5:
        limits["size"] = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return limits


def effective_pixel_limits(image_processor: Any) -> set[tuple[int, int]]:
    """Every (min, max) pixel limit the image processor holds; one element when they agree."""
    # 4.49 resizes with its min_pixels/max_pixels attributes, later versions with size; check all present.
    found = set()
    size = getattr(image_processor, "size", None)
    if size is not None:
        found.add((size["shortest_edge"], size["longest_edge"]))
    if isinstance(getattr(image_processor, "min_pixels", None), int):
        found.add((image_processor.min_pixels, image_processor.max_pixels))
    return found


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward merges the image features and returns hidden states."""
    # transformers >= 4.52: model.model is the whole vision+language backbone (no LM head, no logits).
    # transformers 4.49: model.model is text-only; only the outer forward merges the image features.
    return model.model if hasattr(model.model, "visual") else model


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """Qwen2.5-VL's vision encoder: on the inner model from transformers 4.52, on the outer one before."""
    return getattr(model.model, "visual", None) or model.visual


def vision_features(model: torch.nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """The merged image features [tokens, hidden] as the language model receives them."""
    visual = vision_tower(model)
    out = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw)
    # transformers 4.x returns the merged features, 5.x an output object holding them as pooler_output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def mrope_position_ids(
    model: torch.nn.Module, input_ids: torch.Tensor, image_grid_thw: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Qwen2.5-VL's 3-D positions [3, 1, L] as transformers 4.x computes them from the ids."""
    # transformers >= 4.52 keeps get_rope_index on the inner Qwen2_5_VLModel; 4.49 on the outer model.
    get_rope_index = getattr(model.model, "get_rope_index", None) or model.get_rope_index
    kwargs: dict[str, Any] = {"image_grid_thw": image_grid_thw, "attention_mask": attention_mask}
    if "mm_token_type_ids" in inspect.signature(get_rope_index).parameters:
        # transformers >= 5.3 finds the image tokens through their token type instead of the ids.
        kwargs["mm_token_type_ids"] = (input_ids == model.config.image_token_id).int()
    position_ids, _ = get_rope_index(input_ids, **kwargs)
    # Masked tokens (id 0 = "!") are skipped when counting; 4.x leaves them at 1 (transformers 5.3+: 0).
    return position_ids.masked_fill(attention_mask[None] == 0, 1)


def image_token_types(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The extra input Qwen2.5-VL needs to find the image tokens, where this version needs one.

    transformers >= 5.3 derives the 3-D mRoPE positions from ``mm_token_type_ids`` (1 = image token; its
    processor returns them) and falls back to plain sequential positions without; 4.x reads the ids.
    """
    get_rope_index = getattr(model.model, "get_rope_index", None) or model.get_rope_index
    if "mm_token_type_ids" not in inspect.signature(get_rope_index).parameters:
        return {}
    return {"mm_token_type_ids": (input_ids == model.config.image_token_id).int()}


def sequential_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """What transformers >= 5.3 falls back to without ``mm_token_type_ids``: 0..L-1 on all three axes."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return positions.view(1, 1, -1).expand(3, input_ids.shape[0], -1)
