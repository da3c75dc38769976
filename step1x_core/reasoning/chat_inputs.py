"""A thinker request as Qwen2.5-VL's inputs: the chat text, the images as the reference prepares them, ids.

The reference's client (``QwenGenerativeAIClient``) renders the messages with the stock Qwen2.5-VL chat
template (no "Picture N:"), sends every image through a PNG data URL and ``qwen_vl_utils``, and then
through the Qwen2-VL processor with min/max pixels 512² / 896². Each image therefore goes:

1. RGB; if its longer side exceeds 1024, Pillow's ``thumbnail((1024, 1024))`` (bicubic, reducing gap 2);
2. PNG encode and decode (the data URL; lossless for RGB, kept so the pixels are the ones PNG carries);
3. ``qwen_vl_utils``' resize: multiples of 28 within 4·28²..16384·28², PIL bicubic;
4. the image processor's own resize into 262144..802816 pixels, as transformers' default ("fast")
   processor does it with torchvision (reference: transformers 4.55 with torchvision), then its
   normalisation and patches.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ..qwen.vision_input import processor_sized_image, with_pixel_limits
from .prompts import CHAT_TEMPLATE, ChatItem

__all__ = ["MAX_PIXELS", "MIN_PIXELS", "THUMBNAIL_SIDE", "chat_messages", "chat_text", "encode_chat",
           "thinker_image", "thinker_image_processor"]

MIN_PIXELS = 262144  # 512 * 512
MAX_PIXELS = 802816  # 896 * 896
THUMBNAIL_SIDE = 1024
IMAGE_PAD = "<|image_pad|>"


def chat_messages(system: str, content: Sequence[ChatItem]) -> list[dict[str, Any]]:
    """The chat-template messages: the system prompt, then one user message with the items in order."""
    items = [{"type": "image"} if isinstance(item, Image.Image) else {"type": "text", "text": item}
             for item in content]
    return [{"role": "system", "content": system}, {"role": "user", "content": items}]


def chat_text(tokenizer: Any, system: str, content: Sequence[ChatItem]) -> str:
    """The templated text, one ``<|image_pad|>`` per image, ending with the assistant's turn."""
    # The packaged stock template, whatever template the checkpoint folder carries (the reference's
    # processor folder has the stock one; ours may come from a single file without any).
    return tokenizer.apply_chat_template(chat_messages(system, content), chat_template=CHAT_TEMPLATE,
                                         tokenize=False, add_generation_prompt=True)


def _png_round_trip(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return decoded.convert("RGB")


def thinker_image(image: Image.Image, image_processor: Any) -> Image.Image:
    """``image`` at the size and with the pixels the image processor then only normalises (steps 1-4)."""
    rgb = image.convert("RGB")
    if max(rgb.size) > THUMBNAIL_SIDE:
        rgb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))  # Pillow's own rounding and reducing step
    return processor_sized_image(_png_round_trip(rgb), image_processor, "torch", MIN_PIXELS, MAX_PIXELS)


def thinker_image_processor(image_processor: Any) -> Any:
    """The checkpoint's Qwen2-VL image processor with the thinker's pixel limits (a copy)."""
    return with_pixel_limits(image_processor, MIN_PIXELS, MAX_PIXELS)


def _expand_image_pads(text: str, tokens_per_image: list[int]) -> str:
    pieces = text.split(IMAGE_PAD)
    if len(pieces) - 1 != len(tokens_per_image):
        raise ValueError(f"the chat text has {len(pieces) - 1} image placeholder(s) for {len(tokens_per_image)} "
                         "image(s); an instruction must not contain Qwen's <|image_pad|> token")
    expanded = [pieces[0]]
    for count, piece in zip(tokens_per_image, pieces[1:]):
        expanded += [IMAGE_PAD * count, piece]
    return "".join(expanded)


def encode_chat(tokenizer: Any, image_processor: Any, system: str, content: Sequence[ChatItem]
                ) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (batch of one, image pads expanded) and, with images,
    ``pixel_values`` and ``image_grid_thw``: what the reference's processor call returns.

    ``image_processor`` must already carry the thinker's limits (``thinker_image_processor``).
    """
    text = chat_text(tokenizer, system, content)
    images = [thinker_image(item, image_processor) for item in content if isinstance(item, Image.Image)]
    inputs: dict[str, torch.Tensor] = {}
    tokens_per_image: list[int] = []
    if images:
        vision = image_processor(images=images, return_tensors="pt")
        inputs["pixel_values"] = vision["pixel_values"]
        inputs["image_grid_thw"] = vision["image_grid_thw"]
        merge = image_processor.merge_size ** 2
        tokens_per_image = [int(grid.prod()) // merge for grid in vision["image_grid_thw"]]
    ids = tokenizer(_expand_image_pads(text, tokens_per_image), return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **inputs}
