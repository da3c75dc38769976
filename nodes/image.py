"""Image nodes: the size-level resize before editing and the way back after decoding."""

from __future__ import annotations

from typing import Callable

import torch
from comfy_api.latest import io
from PIL import Image

from ..step1x_core.images.sizing import RESAMPLE_FILTERS, pil_to_tensor, resize_to_level, restore_size, tensor_to_pil
from ..step1x_core.images.masking import feather_inward, paste_masked, resize_mask
import comfy.utils

from .inputs import check_combos
from .types import CATEGORY

SIZE_LEVELS = ["512", "768", "1024", "custom"]


def _each_frame(image: torch.Tensor, resize: Callable[[Image.Image], Image.Image]) -> torch.Tensor:
    """Apply a PIL resize to every frame of a ComfyUI IMAGE batch [B, H, W, 3]."""
    if image.ndim != 4 or image.shape[0] == 0 or image.shape[-1] not in (3, 4):
        raise ValueError(f"expected an IMAGE batch [batch, height, width, 3 or 4 channels], got shape "
                         f"{list(image.shape)}" + (" (an empty batch)" if image.ndim == 4 and not image.shape[0] else ""))
    frames = [pil_to_tensor(resize(tensor_to_pil(frame, channels_last=True)), channels_last=True) for frame in image]
    return frames[0].unsqueeze(0) if len(frames) == 1 else torch.stack(frames)


class Step1XEditImageScale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditImageScale",
            display_name="Step1X-Edit Image Scale",
            category=CATEGORY,
            description="Resizes the image to Step1X-Edit's working size: about size_level² pixels at the same "
                        "aspect ratio, both sides multiples of 16. Also returns the original size.",
            inputs=[
                io.Image.Input("image", tooltip="The image to edit."),
                io.Combo.Input("size_level", options=SIZE_LEVELS, default="1024",
                               tooltip="Working resolution: about N×N pixels. 1024 gives the sharpest edits; "
                                       "512 is about 4x faster."),
                io.Int.Input("custom_size", default=1024, min=16, max=4096, step=16,
                             tooltip="Used when size_level is custom."),
                io.Combo.Input("resample", options=list(RESAMPLE_FILTERS), default="bicubic",
                               tooltip="Resize filter: bicubic as v1.0's code, lanczos as the later code."),
            ],
            outputs=[
                io.Image.Output("scaled_image", display_name="scaled_image",
                                tooltip="The image at the working size."),
                io.Int.Output("original_width", display_name="original_width",
                              tooltip="The original width, for Step1X-Edit Restore Size."),
                io.Int.Output("original_height", display_name="original_height",
                              tooltip="The original height, for Step1X-Edit Restore Size."),
            ],
        )

    @classmethod
    def execute(cls, image, size_level, custom_size, resample) -> io.NodeOutput:
        check_combos(cls, dict(size_level=size_level, resample=resample))
        level = custom_size if size_level == "custom" else int(size_level)
        resized = _each_frame(image, lambda frame: resize_to_level(frame, level, resample))
        return io.NodeOutput(resized, image.shape[2], image.shape[1])


class Step1XEditRestoreSize(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditRestoreSize",
            display_name="Step1X-Edit Restore Size",
            category=CATEGORY,
            description="Resizes the decoded result back to the original image size, as Step1X-Edit v1.0 does.",
            inputs=[
                io.Image.Input("image", tooltip="The decoded, edited image."),
                io.Int.Input("width", default=1024, min=1, max=16384, tooltip="Target width (from Image Scale)."),
                io.Int.Input("height", default=1024, min=1, max=16384, tooltip="Target height (from Image Scale)."),
                io.Combo.Input("resample", options=list(RESAMPLE_FILTERS), default="bicubic",
                               tooltip="Resize filter (bicubic as the official code)."),
            ],
            outputs=[io.Image.Output(tooltip="The edited image at the original size.")],
        )

    @classmethod
    def execute(cls, image, width, height, resample) -> io.NodeOutput:
        check_combos(cls, dict(resample=resample))
        return io.NodeOutput(_each_frame(image, lambda frame: restore_size(frame, (width, height), resample)))


EMPTY_MASK = ("the mask is empty (nothing painted), so nothing of the edit would be kept: open the input image in Load "
              "Image's mask editor (right-click, Open in MaskEditor) and paint the area to edit")


class Step1XEditMaskedPaste(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditMaskedPaste",
            display_name="Step1X-Edit Masked Paste",
            category=CATEGORY,
            description="Puts the edited area back into the original image at its full resolution: outside the mask "
                        "the result is the original's own pixels (no VAE round trip, no resize, so repeated edits "
                        "never soften the rest of the picture); inside, the edit, with a soft edge.",
            inputs=[
                io.Image.Input("original", tooltip="The input image at full resolution (Load Image's IMAGE)."),
                io.Image.Input("edited", tooltip="The decoded edit at the working size (VAE Decode); it is resized to "
                                                 "the original's size."),
                io.Mask.Input("mask", tooltip="Where to edit (1 = edit): Load Image's MASK, painted in its mask "
                                              "editor. Resized to the original's size."),
                io.Int.Input("feather", default=8, min=0, max=256,
                             tooltip="Width in pixels of the soft edge, inside the mask (0: a hard edge). Areas "
                                     "thinner than twice this get a partial edit."),
                io.Combo.Input("resample", options=list(RESAMPLE_FILTERS), default="bicubic",
                               tooltip="Filter that brings the edit to the original's size."),
            ],
            outputs=[io.Image.Output(tooltip="The original with the masked area edited, at the original's size.")],
        )

    @classmethod
    def execute(cls, original, edited, mask, feather, resample) -> io.NodeOutput:
        check_combos(cls, dict(resample=resample))
        height, width = original.shape[1:3]
        batch = max(original.shape[0], edited.shape[0])
        weight = resize_mask(mask, height, width)
        if not bool(weight.any()):
            raise ValueError(EMPTY_MASK)
        weight = comfy.utils.repeat_to_batch_size(feather_inward(weight, feather), batch)
        edited = _each_frame(edited, lambda frame: restore_size(frame, (width, height), resample))
        original = comfy.utils.repeat_to_batch_size(original, batch)
        edited = comfy.utils.repeat_to_batch_size(edited, batch)
        return io.NodeOutput(paste_masked(original[..., :3], edited[..., :3], weight))
