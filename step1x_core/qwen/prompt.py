"""Step1X-Edit's prompt: the chat text around an instruction, and its quote-aware token ids.

1. Chat text = system message + user message [PREFIX, image, instruction] + generation prompt.
2. Ids: the normal ids (``<|image_pad|>`` expanded) up to the first ``<|vision_end|>``, then the ids of a
   quote-aware re-tokenisation of the chat text from its first ``<|vision_end|>`` on; mask = ids > 0.
3. Of the encoder's output, the first 217 tokens (system part and most of PREFIX) are dropped and at
   most 640 kept.
"""

from __future__ import annotations

import logging
from typing import Any

from .packaged import PREFIX_FILE

__all__ = ["DROP_TOKENS", "EMPTY_INSTRUCTION_WARNING", "MAX_LENGTH", "QWEN_PREFIX", "chat_messages",
           "checked_instruction", "prompt_ids", "quote_aware_ids", "split_quoted", "templated_prompt"]

logger = logging.getLogger(__name__)

QWEN_PREFIX: str = PREFIX_FILE.read_text(encoding="utf-8")
DROP_TOKENS = 217
MAX_LENGTH = 640
EMPTY_INSTRUCTION_WARNING = ("empty instruction: with an empty negative too, guidance has no effect and the result "
                             "stays close to the input image")

IMAGE_PAD = "<|image_pad|>"
VISION_END = "<|vision_end|>"
# The official code's constant: a '"' only toggles the in-quotes state past this character index of the
# chat text, which skips the pair of quotes inside PREFIX (at indices 108 and 124).
QUOTE_TOGGLE_AFTER = 155


def templated_prompt(instruction: str, vision_id: bool = True) -> str:
    """The chat text the official embedder builds for ``instruction``: the Qwen2.5-VL chat template with
    ``add_generation_prompt=True`` and content [PREFIX, image, instruction].

    ``vision_id``: whether "Picture 1: " precedes the image. The official code asks for it
    (``add_vision_id=True``), but transformers <= 4.51 drops that argument on the way to the template.
    """
    picture = "Picture 1: " if vision_id else ""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        f"{QWEN_PREFIX}{picture}<|vision_start|>{IMAGE_PAD}{VISION_END}{instruction}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def chat_messages(instruction: str) -> list[dict[str, Any]]:
    """The chat messages behind ``templated_prompt``, for rendering with a tokenizer's chat template."""
    content = [{"type": "text", "text": QWEN_PREFIX}, {"type": "image"}, {"type": "text", "text": instruction}]
    return [{"role": "user", "content": content}]


def checked_instruction(text: str, tokenizer: Any) -> str:
    """User text made safe to template: unpaired UTF-16 surrogates (a broken escape; the tokenizer cannot
    encode them) become U+FFFD; Qwen's control tokens are refused, since they would restructure the
    prompt (an <|image_pad|> even asks for a second image)."""
    fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if fixed != text:
        logger.warning("the instruction held unpaired UTF-16 surrogates; they were replaced by U+FFFD")
    tokens = sorted(t for t in tokenizer.get_added_vocab() if t.startswith("<|") and t in fixed)
    if tokens:
        raise ValueError(
            f"the instruction {fixed[:80]!r} contains Qwen2.5-VL control token(s) {', '.join(tokens)}, which "
            "would break Step1X-Edit's prompt template; remove them"
        )
    return fixed


def split_quoted(text: str) -> list[str]:
    """Split ``text`` the way Step1X-Edit re-tokenises quoted text (one piece per quoted character).

    “ ” and ' all count as ". A " past character index 155 opens or closes a quote; the quote characters
    stay in the surrounding text; every character inside quotes becomes its own piece, wrapped as “c”.
    """
    normalised = text.replace("“", '"').replace("”", '"').replace("'", '"')
    pieces: list[str] = []
    outside = ""
    in_quotes = False
    for index, char in enumerate(normalised):
        if char == '"' and index > QUOTE_TOGGLE_AFTER:
            outside += char
            if not in_quotes:  # an opening quote ends the text before it
                pieces.append(outside)
                outside = ""
            in_quotes = not in_quotes
        elif in_quotes:
            pieces.append(f"“{char}”")
        else:
            outside += char
    if outside:
        pieces.append(outside)
    return pieces


def _single_id(tokenizer: Any, text: str) -> int:
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits {text!r} into {len(ids)} tokens; Step1X-Edit needs Qwen2.5's "
                         "tokenizer, where it is one")
    return ids[0]


def quote_aware_ids(tokenizer: Any, text: str) -> list[int]:
    """Tokenise each ``split_quoted`` piece on its own; drop the “ ” around a piece when both survive as
    their own tokens, so quoted text ends up one token per character."""
    open_quote, close_quote = _single_id(tokenizer, "“"), _single_id(tokenizer, "”")
    ids: list[int] = []
    for piece in split_quoted(text):
        piece_ids = list(tokenizer(piece)["input_ids"])
        if piece_ids[0] == open_quote and piece_ids[-1] == close_quote:
            piece_ids = piece_ids[1:-1]
        ids.extend(piece_ids)
    return ids


def prompt_ids(tokenizer: Any, text: str, image_tokens: int) -> list[int]:
    """The ids fed to Qwen for a chat text: what the Qwen2.5-VL processor makes of it (the image pad
    expanded to ``image_tokens``) up to the first <|vision_end|>, the quote-aware ids from there on."""
    processor_ids = list(tokenizer(text.replace(IMAGE_PAD, IMAGE_PAD * image_tokens, 1))["input_ids"])
    requoted_ids = quote_aware_ids(tokenizer, text)
    vision_end = tokenizer.convert_tokens_to_ids(VISION_END)
    return processor_ids[: processor_ids.index(vision_end)] + requoted_ids[requoted_ids.index(vision_end):]
