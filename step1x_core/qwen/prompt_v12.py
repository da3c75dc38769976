"""Step1X-Edit v1.2's prompt: the chat text around an instruction, its quote-aware pieces and token ids.

1. Chat text = system message + user message [EDIT_PREFIX + " " + instruction, image] + generation prompt,
   with "Picture 1: " before the image (the reference asks the template for vision ids).
2. Pieces: the text is split at Qwen's special tokens, then each other segment by quotes: every character
   inside "..." or “...” becomes a piece of its own, flagged as quoted (the quote marks stay outside).
3. Ids: each piece is tokenised on its own (so no merge crosses a piece boundary); ``<|image_pad|>`` becomes
   the image's tokens. The text mask is 1 on the tokens of quoted characters.
4. Of the encoder's output the first 90 tokens (system turn and all but the prefix's last ":") are dropped,
   and at most 2048 kept, unpadded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .packaged import ASSETS

__all__ = ["DROP_TOKENS_V12", "EDIT_PREFIX", "MAX_LENGTH_V12", "T2I_NEGATIVE_PROMPT", "PromptTokens", "prompt_tokens",
           "split_pieces", "split_quotes", "templated_prompt_v12"]

EDIT_PREFIX: str = (ASSETS / "edit_prefix_v12.txt").read_text(encoding="utf-8")
# The default negative prompt without an input image (text-to-image), v1.1 port and v1.2 alike.
T2I_NEGATIVE_PROMPT: str = (ASSETS / "t2i_negative_prompt.txt").read_text(encoding="utf-8")
DROP_TOKENS_V12 = 90
MAX_LENGTH_V12 = 2048
IMAGE_PAD = "<|image_pad|>"
_QUOTES = {'"': '"', "“": "”"}  # opening -> closing; the two kinds never close each other


def templated_prompt_v12(instruction: str) -> str:
    """The chat text of the v1.2 reference for ``instruction`` (stock Qwen2.5-VL template, vision ids on).
    Nothing separates the instruction from "Picture 1: ", as in the reference."""
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"{EDIT_PREFIX} {instruction}Picture 1: <|vision_start|>{IMAGE_PAD}<|vision_end|><|im_end|>\n"
            "<|im_start|>assistant\n")


def split_quotes(segment: str, protected: int) -> list[tuple[str, bool]]:
    """(piece, quoted) for one segment without special tokens; its first ``protected`` characters are never
    read as quotes. The reference's rules, quirks included: an opening “ with nothing before it in the
    piece is dropped; an unclosed quote changes nothing but where pieces end."""
    pieces: list[tuple[str, bool]] = []
    buffer = ""
    closing: str | None = None  # the quote that ends the current quoted run
    quoted: list[str] = []
    for index, char in enumerate(segment):
        if index < protected:
            buffer += char
        elif closing is None:
            if char in _QUOTES:
                if char == '"' or buffer:
                    pieces.append((buffer + char, False))
                buffer, closing = "", _QUOTES[char]
            else:
                buffer += char
        elif char == closing:
            pieces.extend((c, True) for c in quoted)
            quoted, buffer, closing = [], char, None
        else:
            quoted.append(char)
    if closing is not None:  # unbalanced: the collected characters go back into the text
        leftover = "".join(quoted) + buffer
        if pieces and not pieces[-1][1]:
            pieces[-1] = (pieces[-1][0] + leftover, False)
        else:
            pieces.append((leftover, False))
    elif buffer:
        pieces.append((buffer, False))
    return pieces


def special_tokens(tokenizer: Any) -> list[str]:
    """The strings the reference splits at: the tokenizer's added tokens (for Qwen2.5-VL ids 151643-151664)."""
    found = {token.content for token in tokenizer.added_tokens_decoder.values()}
    found.update(getattr(tokenizer, "additional_special_tokens", None) or [])
    return sorted(found, key=len, reverse=True)


def split_pieces(text: str, specials: list[str], protected: int = len(EDIT_PREFIX)) -> list[tuple[str, bool]]:
    """The chat text as (piece, quoted): special tokens alone, every other segment through
    ``split_quotes``, protected up to ``protected`` characters from the start of the whole text."""
    pattern = "(" + "|".join(re.escape(token) for token in specials) + ")"
    pieces: list[tuple[str, bool]] = []
    start = 0
    for part in (p for p in re.split(pattern, text) if p):
        if part in specials:
            pieces.append((part, False))
        else:
            pieces.extend(split_quotes(part, max(0, protected - start)))
        start += len(part)
    return pieces


@dataclass(frozen=True)
class PromptTokens:
    input_ids: list[int]
    text_mask: list[int]  # 1 on the tokens of quoted characters


def prompt_tokens(tokenizer: Any, text: str, image_tokens: int, image_token_id: int) -> PromptTokens:
    """Each piece of ``text`` tokenised on its own; ``<|image_pad|>`` stands for ``image_tokens`` image tokens."""
    ids: list[int] = []
    mask: list[int] = []
    for piece, quoted in split_pieces(text, special_tokens(tokenizer)):
        if piece == IMAGE_PAD:
            piece_ids = [image_token_id] * image_tokens
        else:
            piece_ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
        ids.extend(piece_ids)
        mask.extend([int(quoted)] * len(piece_ids))
    return PromptTokens(ids, mask)
