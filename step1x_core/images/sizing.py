"""Image sizing for Step1X-Edit: the size-level resize and the way back, plus PIL <-> tensor.

A size level S asks for about S*S pixels at the input's aspect ratio; both sides are then floored
to a multiple of 16 (the VAE's 8x downsampling times the 2x2 token patch). There are no buckets.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..finite import require_finite_tensor
from .reading import to_rgb

MULTIPLE = 16
MAX_SIZE_LEVEL = 4096  # as the ComfyUI node's custom size; 1024 is the official setting
# Qwen2.5-VL's image processor refuses images over 200:1 once their sides are rounded to 28 pixels; 100:1
# keeps every working image (floored to 16, then rounded to 28) under that.
MAX_ASPECT_RATIO = 100
RESAMPLE_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,  # v1.0's PIL default
    "lanczos": Image.Resampling.LANCZOS,  # the later official code
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def size_for_level(width: int, height: int, size_level: int) -> tuple[int, int]:
    """(width, height) with area about size_level**2, the input's aspect ratio, multiples of 16.

    The official arithmetic: fit the longer side with ceil, derive the other with ceil, floor both
    to 16.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not MULTIPLE <= size_level <= MAX_SIZE_LEVEL:
        raise ValueError(f"size_level must be between {MULTIPLE} and {MAX_SIZE_LEVEL} (1024 is the official "
                         f"setting), got {size_level}")
    ratio = width / height
    if max(ratio, 1 / ratio) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"the aspect ratio of a {width}x{height} image ({max(ratio, 1 / ratio):.0f}:1) is too extreme: "
            f"Step1X-Edit's Qwen2.5-VL encoder takes at most {MAX_ASPECT_RATIO}:1; crop the image"
        )
    if width > height:
        new_w = math.ceil(math.sqrt(size_level * size_level * ratio))
        new_h = math.ceil(new_w / ratio)
    else:
        new_h = math.ceil(math.sqrt(size_level * size_level / ratio))
        new_w = math.ceil(new_h * ratio)
    new_w, new_h = new_w // MULTIPLE * MULTIPLE, new_h // MULTIPLE * MULTIPLE
    if new_w < MULTIPLE or new_h < MULTIPLE:
        raise ValueError(
            f"a {width}x{height} image at size level {size_level} would be {new_w}x{new_h}; its aspect "
            f"ratio is too extreme for this size level: raise the size level or crop the image"
        )
    return new_w, new_h


def resample_filter(name: str) -> Image.Resampling:
    try:
        return RESAMPLE_FILTERS[name]
    except KeyError:
        raise ValueError(f"unknown resample filter {name!r}; choose one of {sorted(RESAMPLE_FILTERS)}") from None


def resize_to_level(image: Image.Image, size_level: int, resample: str = "bicubic") -> Image.Image:
    """The working image: `image` resized to `size_for_level` with the given PIL filter."""
    size = size_for_level(image.width, image.height, size_level)
    return image.resize(size, resample_filter(resample))


def restore_size(image: Image.Image, size: tuple[int, int], resample: str = "bicubic") -> Image.Image:
    """Back to the original (width, height), as v1.0 does after decoding."""
    return image if image.size == tuple(size) else image.resize(tuple(size), resample_filter(resample))


ROWS = 512  # rows converted at a time: a large frame never gets a second float copy


def pil_to_tensor(image: Image.Image, channels_last: bool = False) -> Tensor:
    """PIL image -> RGB float tensor in [0, 1]: [1, 3, H, W], or [H, W, 3] (ComfyUI's IMAGE frame)
    with ``channels_last``, which makes one float copy only."""
    array = np.asarray(to_rgb(image), dtype=np.float32)
    array /= 255.0
    tensor = torch.from_numpy(array)
    return tensor if channels_last else tensor.permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(image: Tensor, channels_last: bool = False, rounding: bool = False) -> Image.Image:
    """RGB in [0, 1] -> 8-bit PIL: [3, H, W] or [1, 3, H, W], or [H, W, 3] (RGBA: 4) with ``channels_last``.

    Truncates like torchvision's ToPILImage (``mul(255).byte()``, what the official code and
    ComfyUI's SaveImage do), after clamping (``byte()`` would wrap around outside [0, 1]); with ``rounding``
    it rounds to the nearest level instead (diffusers' numpy_to_pil, what the v1.2 reference does). A band
    of rows at a time, so a large frame gets no full float copy."""
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if not channels_last and image.ndim == 3 and image.shape[0] == 3:
        image = image.permute(1, 2, 0)
    elif not (channels_last and image.ndim == 3 and image.shape[-1] in (3, 4)):  # RGBA: to_rgb composites it
        layout = "[H, W, 3 or 4]" if channels_last else "[3, H, W]"
        raise ValueError(f"expected an RGB image tensor {layout} in [0, 1], got shape {tuple(image.shape)}")
    pixels = torch.empty(image.shape, dtype=torch.uint8)
    for top in range(0, image.shape[0], ROWS):
        band = image[top:top + ROWS].detach().float().cpu()
        require_finite_tensor("the image", band, "a step before this one produced NaN/Inf (clamped, it would be "
                              "black or white); see the error of that step, or check the model files")
        band = band.clamp(0, 1) * 255.0
        pixels[top:top + ROWS] = (band.round() if rounding else band).to(torch.uint8)
    return Image.fromarray(pixels.numpy())
