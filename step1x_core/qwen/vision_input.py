"""The reference image as Qwen2.5-VL sees it: the official resizes and the image processor.

The official code turns the tensor into PIL (``mul(255).byte()``), resizes it like ``qwen_vl_utils``
(multiples of 28, bicubic), then hands it to the Qwen2-VL image processor with min/max pixels
256*28*28 / 324*28*28, which resizes once more (PIL or torchvision, see ``OfficialBehaviour.resize``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from ..images.sizing import tensor_to_pil
from .transformers_versions import (effective_pixel_limits, pil_image_processor_class, pixel_limit_kwargs,
                                    smart_resize)

__all__ = ["MAX_PIXELS", "MIN_PIXELS", "load_image_processor", "prepare_vlm_image", "processor_sized_image",
           "resized_for_processor", "with_pixel_limits"]

logger = logging.getLogger(__name__)

MIN_PIXELS = 256 * 28 * 28
MAX_PIXELS = 324 * 28 * 28

# qwen_vl_utils.process_vision_info's defaults for its own (first) resize of a PIL image.
_VL_UTILS_FACTOR = 28
_VL_UTILS_MIN_PIXELS = 4 * 28 * 28
_VL_UTILS_MAX_PIXELS = 16384 * 28 * 28


def prepare_vlm_image(image: Image.Image | torch.Tensor) -> Image.Image:
    """The reference image as the official code hands it to the Qwen processor: RGB PIL, resized
    (bicubic) to multiples of 28 like ``qwen_vl_utils.process_vision_info`` does with its defaults."""
    pil = image if isinstance(image, Image.Image) else tensor_to_pil(image)
    pil = pil.convert("RGB")
    height, width = smart_resize(pil.height, pil.width, _VL_UTILS_FACTOR, _VL_UTILS_MIN_PIXELS, _VL_UTILS_MAX_PIXELS)
    return pil.resize((width, height), Image.Resampling.BICUBIC)


def _resize_like_torchvision(image: Image.Image, height: int, width: int) -> Image.Image:
    """The resize of transformers' default ("fast") Qwen2-VL image processor, without torchvision.

    That processor resizes the uint8 tensor with torchvision, which on CPU calls torch's antialiased
    bicubic kernel on uint8 directly (and skips same-size resizes); this makes the same call.
    """
    if (image.height, image.width) == (height, width):
        return image
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None]
    resized = F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return Image.fromarray(resized[0].permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def processor_sized_image(image: Image.Image | torch.Tensor, image_processor: Any, resize: str,
                          min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image after both official resizes ("torch"), or ready for the processor's own resize ("pil").

    ``min_pixels``/``max_pixels``: the limits of the image processor's own resize (Step1X-Edit's
    encoder by default; v1.2's thinker uses others).
    """
    pil = prepare_vlm_image(image)
    if resize == "pil":
        return pil  # the PIL image processor resizes it itself
    return resized_for_processor(pil, image_processor, min_pixels, max_pixels)


def resized_for_processor(image: Image.Image, image_processor: Any, min_pixels: int, max_pixels: int) -> Image.Image:
    """``image`` at the size the Qwen2-VL processor gives it (multiples of 28 within the pixel limits), resized
    as transformers' default ("fast") processor does, so the processor's own resize leaves it untouched."""
    factor = image_processor.patch_size * image_processor.merge_size
    height, width = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    return _resize_like_torchvision(image, height, width)


def load_image_processor(folder: Path, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Any:
    """The PIL Qwen2-VL image processor with the folder's settings and the given pixel limits
    (Step1X-Edit's by default)."""
    processor_class = pil_image_processor_class()
    has_config = any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json"))
    if has_config:
        settings, _ = processor_class.get_image_processor_dict(str(folder))
    else:
        logger.warning("'%s' has no preprocessor_config.json; using Qwen2-VL's default image settings", folder)
        settings = {}
    return _with_limits(processor_class, settings, min_pixels, max_pixels)


def with_pixel_limits(image_processor: Any, min_pixels: int, max_pixels: int) -> Any:
    """A copy of a PIL Qwen2-VL image processor with other pixel limits (the original is unchanged)."""
    # Drop the old limits whatever their spelling on this version (size, or min_pixels/max_pixels).
    settings = {k: v for k, v in image_processor.to_dict().items() if k not in ("size", "min_pixels", "max_pixels")}
    return _with_limits(type(image_processor), settings, min_pixels, max_pixels)


def _with_limits(processor_class: type, settings: dict[str, Any], min_pixels: int, max_pixels: int) -> Any:
    # Override the limits before construction: from_pretrained(**kwargs) would set them as attributes
    # afterwards, which 4.49 leaves half-applied (min_pixels updated, size not).
    image_processor = processor_class.from_dict({**settings, **pixel_limit_kwargs(min_pixels, max_pixels)})
    if effective_pixel_limits(image_processor) != {(min_pixels, max_pixels)}:
        raise RuntimeError(
            f"the Qwen2-VL image processor did not take min/max pixels {min_pixels}/{max_pixels} "
            f"(transformers {transformers.__version__}); got {effective_pixel_limits(image_processor)}"
        )
    return image_processor
