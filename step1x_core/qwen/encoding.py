"""The encoded prompt: what the Qwen-VL side hands the DiT, in either prompt format."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass(frozen=True)
class PromptEncoding:
    """B prompts encoded in one format (v1.0/v1.1's or v1.2's), as the DiT's connector reads them."""

    hidden: Tensor  # [B, T, hidden] Qwen-VL's last hidden states, compute dtype (zero past each prompt's tokens)
    mask: Tensor  # [B, T] long, 1 for kept tokens
    txt_ids: Tensor  # [B, T, 3] float32 RoPE ids of the text stream: zeros in v1.0/v1.1's format
    text_embeds: Tensor | None = None  # v1.2: [B, T, hidden] raw input embeddings (image features at image rows)
    text_mask: Tensor | None = None  # v1.2: [B, T] long, 1 on quoted characters
    dropped_tokens: tuple[int, ...] = ()  # per prompt, tokens lost to the format's length limit
    input_ids: Tensor | None = None  # [B, N] what the encoder read, where a format records it

    @property
    def batch(self) -> int:
        return self.hidden.shape[0]

    def _each(self, change) -> dict:
        return {f.name: change(getattr(self, f.name)) if isinstance(getattr(self, f.name), Tensor)
                else getattr(self, f.name) for f in fields(self)}

    def to(self, device: torch.device | str) -> PromptEncoding:
        return PromptEncoding(**self._each(lambda t: t.to(device)))

    @staticmethod
    def cat(encodings: list[PromptEncoding]) -> PromptEncoding:
        """One batch of prompts of one length (e.g. one instruction for several images)."""
        lengths = {e.hidden.shape[1] for e in encodings}
        if len(lengths) > 1:
            raise ValueError(f"these prompts have different lengths {sorted(lengths)}; encode them one at a time")
        joined = {}
        for f in fields(PromptEncoding):
            values = [getattr(e, f.name) for e in encodings]
            if f.name == "dropped_tokens":
                joined[f.name] = tuple(n for v in values for n in v)
            elif any(v is None for v in values):
                joined[f.name] = None
            elif f.name == "input_ids" and len({v.shape[1] for v in values}) > 1:
                joined[f.name] = None
            else:
                joined[f.name] = torch.cat(values)
        return PromptEncoding(**joined)
