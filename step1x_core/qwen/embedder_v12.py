"""Step1X-Edit v1.2's text+image encoder: the fine-tuned Qwen2.5-VL's hidden states for (instruction, image),
with what v1.2's DiT reads beside them (its text positions, and the raw embeddings of quoted characters).

What the reference's ``encode_prompt`` does, on transformers' own pieces and the same loaded model as the
v1.0/v1.1 embedder: the prompt (``prompt_v12``), the image at the processor's size for 256-400 merged tokens,
one forward with the reference's 3-D positions (``positions_v12``) and no padding mask (a "!" is attended,
though its position skips it); the last hidden state from token 90 on, at most 2048 tokens, unpadded.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from PIL import Image
from torch import Tensor

from ..ops import FP8_DTYPES
from .encoding import PromptEncoding
from .positions_v12 import dit_text_ids, mrope_positions
from .prompt import checked_instruction
from .prompt_v12 import DROP_TOKENS_V12, MAX_LENGTH_V12, PromptTokens, prompt_tokens, templated_prompt_v12
from .transformers_versions import backbone, vision_features, vision_tower
from .vision_input import resized_for_processor, with_pixel_limits

__all__ = ["MAX_PIXELS_V12", "MIN_PIXELS_V12", "QwenV12Embedder"]

logger = logging.getLogger(__name__)

MIN_PIXELS_V12 = 256 * 28 * 28
MAX_PIXELS_V12 = 400 * 28 * 28


@contextlib.contextmanager
def _vision_rotary_in_float32(model: torch.nn.Module) -> Iterator[None]:
    """The reference casts the vision tower's rotary table to float32 before encoding (for good, as a side
    effect); here only while encoding."""
    rotary = vision_tower(model).rotary_pos_emb
    dtypes = {name: buffer.dtype for name, buffer in rotary.named_buffers()}
    rotary.float()
    try:
        yield
    finally:
        for name, dtype in dtypes.items():
            buffer = rotary.get_buffer(name)
            buffer.data = buffer.data.to(dtype)


class QwenV12Embedder:
    """``(instruction, image) -> PromptEncoding`` in v1.2's format (batch 1: cond and uncond have their own
    lengths) with a loaded Qwen2.5-VL (v1.2's fine-tuned one for faithful results). ``image`` is what the reference shows the MLLM: the input resized (Lanczos) to the DiT's working
    size, or a black square for text-to-image."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, image_processor: Any, dtype: torch.dtype | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.image_processor = with_pixel_limits(image_processor, MIN_PIXELS_V12, MAX_PIXELS_V12)
        self._dtype = dtype or next(p.dtype for p in model.parameters() if p.dtype not in FP8_DTYPES)
        self.image_token_id = model.config.image_token_id

    @classmethod
    def from_embedder(cls, embedder: Any) -> QwenV12Embedder:
        """The v1.2 encoder over the model, tokenizer and processor settings of a loaded ``QwenVLEmbedder``."""
        return cls(embedder.model, embedder.tokenizer, embedder.image_processor, embedder.dtype)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def vision_inputs(self, image: Image.Image) -> dict[str, Tensor]:
        sized = resized_for_processor(image.convert("RGB"), self.image_processor, MIN_PIXELS_V12, MAX_PIXELS_V12)
        vision = self.image_processor(images=[sized], return_tensors="pt")
        return {"pixel_values": torch.as_tensor(vision["pixel_values"]),
                "image_grid_thw": torch.as_tensor(vision["image_grid_thw"])}

    def _tokens(self, instruction: str, vision: dict[str, Tensor]) -> PromptTokens:
        grid = vision["image_grid_thw"][0]
        image_tokens = int(grid.prod()) // self.image_processor.merge_size ** 2
        text = templated_prompt_v12(checked_instruction(instruction, self.tokenizer))
        return prompt_tokens(self.tokenizer, text, image_tokens, self.image_token_id)

    def token_ids(self, instruction: str, image: Image.Image) -> list[int]:
        """The ids the encoder reads for (instruction, image), without running the model."""
        return self._tokens(instruction, self.vision_inputs(image)).input_ids

    @torch.inference_mode()
    def __call__(self, instruction: str, image: Image.Image) -> PromptEncoding:
        vision = self.vision_inputs(image)
        grid = tuple(int(v) for v in vision["image_grid_thw"][0])
        merge = self.image_processor.merge_size
        tokens = self._tokens(instruction, vision)
        ids = torch.tensor([tokens.input_ids], dtype=torch.long)
        positions = mrope_positions(tokens.input_ids, (ids[0] > 0).tolist(), grid, self.image_token_id, merge)

        device = self.device
        with _vision_rotary_in_float32(self.model):
            features = vision_features(self.model, vision["pixel_values"].to(device), vision["image_grid_thw"].to(device))
        embeds = self.model.get_input_embeddings()(ids.to(device))
        is_image = (ids == self.image_token_id).to(device)
        embeds = embeds.masked_scatter(is_image[..., None].expand_as(embeds), features.to(embeds.dtype))
        # All ones: causal attention over every token, "!" included, as the reference's unmasked forward.
        outputs = backbone(self.model)(inputs_embeds=embeds, attention_mask=torch.ones_like(ids, device=device),
                                       position_ids=positions[:, None].to(device), output_hidden_states=True,
                                       use_cache=False, return_dict=True)
        hidden = outputs.hidden_states[-1]

        available = ids.shape[1] - DROP_TOKENS_V12
        length = min(MAX_LENGTH_V12, available)
        if available > MAX_LENGTH_V12:
            logger.warning("Step1X-Edit v1.2 prompt too long: %d tokens after the first %d, only %d kept; the end "
                           "(image tokens first, then the assistant turn) is lost", available, DROP_TOKENS_V12,
                           MAX_LENGTH_V12)
        kept = slice(DROP_TOKENS_V12, DROP_TOKENS_V12 + length)
        txt_ids = dit_text_ids(positions, ids[0] == self.image_token_id, (grid[1] // merge, grid[2] // merge),
                               image.size, DROP_TOKENS_V12, length)
        mask = torch.tensor([tokens.text_mask], dtype=torch.long)
        return PromptEncoding(hidden[:, kept].to(self.dtype), torch.ones(1, length, dtype=torch.long, device=device),
                              txt_ids[None].to(device), embeds[:, kept].to(self.dtype), mask[:, kept].to(device),
                              (max(0, available - MAX_LENGTH_V12),), ids)
