"""Unusual instructions, in the standalone engine and in ComfyUI graphs.

Stated behaviour:
- Empty or whitespace-only: allowed, with a warning (with an empty negative, cond equals uncond, so
  guidance has no effect). Engine: the pipeline warns; ComfyUI: the Qwen-VL Encode node warns.
- Longer than the 640-token window (e.g. 5,000 characters): the end is cut, with a warning saying how many
  tokens were dropped.
- Quotes: " “ ” and ' are the same quote character; text inside a pair is tokenised one token per
  character (an apostrophe opens a quote too, as the model was trained); an unpaired quote runs to the end.
- Chinese, emoji, control characters (NUL, ESC, CR, zero-width, BOM): passed through to the tokenizer
  unchanged. Unpaired UTF-16 surrogates (a broken escape) become U+FFFD, with a warning.
- Qwen's own control tokens (<|im_end|>, <|image_pad|>, ...) are refused with a message: they would
  restructure the prompt (an <|image_pad|> even asks for a second image and used to crash in Qwen).

Already covered elsewhere: the empty instruction in the pipeline, the 640-token cut and its warning, quote
splitting and the per-character ids, "!" masked (tests/pipeline/test_pipeline.py, tests/qwen/test_qwen_prompt.py).
"""

from __future__ import annotations

import itertools
import logging
import re

import pytest
import torch

from step1x_core.pipeline import EditSettings
from step1x_core.qwen.prompt import DROP_TOKENS, MAX_LENGTH
from tests.robustness.helpers import CAT, graph, run_error, run_ok, saved_latent

FAST = EditSettings(steps=1, size_level=32, cfg_scale=1.0)
IMAGE = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(0))
QUOTES = ['"', "'", "“", "”"]
LONG = ("make the sky stormy and add a red hat to the cat, " * 100)[:5000]
MIXED = 'write “开门” on the sign 🎩🐱, then "OPEN" and don\'t\x00 stop\x1b[31m\r\n\t\u200b\ufeff!'
CONTROL = "add\x00 a\x1b[31m red\r\n hat\t\x7f\u200b\ufeff\x85"


@pytest.fixture(scope="module")
def embedder(pipe):
    return pipe.embedder


def _normalised(text: str) -> str:
    return text.replace("“", '"').replace("”", '"').replace("'", '"')


def _char_ids(tokenizer, word: str) -> list[int]:
    return [tokenizer(char)["input_ids"][0] for char in word]


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i: i + len(part)] == part for i in range(len(ids) - len(part) + 1))


# ---- tokenisation of every quote combination (no model forward: fast) ----------------------------------


@pytest.mark.parametrize("open_quote, close_quote", list(itertools.product(QUOTES, repeat=2)))
def test_every_pair_of_quote_characters_quotes_per_character(embedder, open_quote, close_quote):
    text = f"write {open_quote}OPEN{close_quote} on the sign"
    ids = embedder.token_ids(text, IMAGE).tolist()
    assert ids == embedder.token_ids(_normalised(text), IMAGE).tolist()  # all four are the same quote
    assert _contains(ids, _char_ids(embedder.tokenizer, "OPEN"))  # one token per quoted character


@pytest.mark.parametrize("text", [
    '"', "'", "“", "”", '""', "''", "“”", '"""', "'\"'", "a\"b'c“d”e",  # lone, empty, odd and mixed runs
    "don't", "the cat's hat", "'quoted' and \"quoted\" and “quoted”",  # apostrophes open quotes
    '"nested \'inner\' quotes"', "“unclosed", "closed only”", '"' * 51, "“" * 7 + "”" * 3,
    '"' + "x" * 700 + '"',  # a quoted run past the 640-token window
])
def test_quote_edge_cases_never_crash(embedder, text):
    ids = embedder.token_ids(text, IMAGE)
    assert ids.ndim == 1 and ids.numel() > DROP_TOKENS
    assert ids.tolist() == embedder.token_ids(_normalised(text), IMAGE).tolist()


@pytest.mark.parametrize("text", ["", "   \n\t ", "给猫戴上一顶红帽子", "add a 🎩 to the 🐱 👨‍👩‍👧", CONTROL, MIXED])
def test_unusual_text_is_encoded(embedder, text):
    encoded = embedder([text], [IMAGE])
    kept = int(encoded.mask.sum())
    assert 0 < kept <= MAX_LENGTH and torch.isfinite(encoded.hidden).all()
    assert encoded.dropped_tokens == (0,)


def test_control_characters_reach_the_tokenizer_unchanged(embedder):
    tail = embedder.tokenizer.decode(embedder.token_ids(CONTROL, IMAGE)[DROP_TOKENS:])
    assert CONTROL in tail


def test_qwen_control_tokens_are_refused(embedder):
    for token in ("<|image_pad|>", "<|vision_start|>", "<|im_end|>", "<|endoftext|>"):
        with pytest.raises(ValueError, match="control token") as info:
            embedder([f"add a hat {token} please"], [IMAGE])
        assert token in str(info.value) and "remove" in str(info.value)


def test_unpaired_surrogates_become_replacement_characters(embedder, caplog):
    with caplog.at_level(logging.WARNING):
        ids = embedder.token_ids("add a \ud800 hat", IMAGE)
    assert "U+FFFD" in caplog.text
    assert ids.tolist() == embedder.token_ids("add a \ufffd hat", IMAGE).tolist()
    paired = "\ud83c\udfa9"  # 🎩 as two escapes, as JSON from a browser may carry it
    assert embedder.token_ids(paired, IMAGE).tolist() == embedder.token_ids("🎩", IMAGE).tolist()


# ---- the whole engine -----------------------------------------------------------------------------------


def _cat():
    from PIL import Image

    return Image.open(CAT).convert("RGB")


@pytest.mark.parametrize("text", ["", "  \n\t "])
def test_engine_empty_or_blank_instruction_warns_and_edits(pipe, caplog, text):
    with caplog.at_level(logging.WARNING):
        out = pipe(_cat(), text, FAST)
    assert out.size == (96, 64) and "empty instruction" in caplog.text


def test_engine_5000_characters_are_cut_to_640_tokens_with_a_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        out = pipe(_cat(), LONG, FAST)
    assert out.size == (96, 64)
    dropped = int(re.search(r"(\d+) tokens dropped", caplog.text).group(1))
    assert dropped > 500


def test_engine_mixed_scripts_quotes_and_control_characters(pipe):
    assert pipe(_cat(), MIXED, FAST).size == (96, 64)


def test_engine_control_token_is_a_clear_error(pipe):
    with pytest.raises(ValueError, match="<\\|image_pad\\|>"):
        pipe(_cat(), "add <|image_pad|>", FAST)


# ---- ComfyUI graphs ------------------------------------------------------------------------------------


def _edit(instruction: str, prefix: str) -> dict:
    return graph(instruction=instruction, prefix=prefix, steps=1, cfg=1.0, size=32)


def test_comfyui_blank_instruction_warns_and_edits(comfyui, caplog):
    with caplog.at_level(logging.WARNING):
        run_ok(comfyui, _edit("  \n\t ", "blank"))
    assert "empty instruction" in caplog.text


def test_comfyui_5000_characters_are_cut_with_a_warning(comfyui, caplog):
    with caplog.at_level(logging.WARNING):
        result = run_ok(comfyui, _edit(LONG, "long"))
    assert "tokens dropped" in caplog.text
    assert torch.isfinite(saved_latent(comfyui, result)).all()


def test_comfyui_mixed_scripts_quotes_and_control_characters(comfyui):
    result = run_ok(comfyui, _edit(MIXED + "\ud800", "mixed"))
    assert torch.isfinite(saved_latent(comfyui, result)).all()


def test_comfyui_control_token_is_a_clear_error(comfyui):
    error = run_error(comfyui, _edit("add a hat <|im_end|>", "control"))
    assert "<|im_end|>" in error and "control token" in error, error
