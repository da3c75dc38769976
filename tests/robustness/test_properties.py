"""Property tests (hypothesis): the size-level arithmetic over its whole domain, the Qwen side accepting every
working size it allows, and the quote-aware tokenisation (never crashes, round-trips the text).

tests/images/test_imaging.py already checks multiples of 16, an upper area bound and the aspect for sizes 16-4000 at
four levels, skipping inputs too extreme for the level; here every input from 1 to 20000 pixels and every
level from 16 to 4096 either gives a valid size or the documented "too extreme" error, and only when needed.
"""

from __future__ import annotations

import math
import unicodedata
from importlib import resources

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from step1x_core.images.sizing import MAX_ASPECT_RATIO, MAX_SIZE_LEVEL, MULTIPLE, restore_size, size_for_level
from step1x_core.qwen.prompt import DROP_TOKENS, quote_aware_ids, split_quoted, templated_prompt
from step1x_core.qwen.vision_input import processor_sized_image

CURLY = str.maketrans("", "", "“”")
sides = st.integers(1, 20000)
levels = st.integers(MULTIPLE, MAX_SIZE_LEVEL)
# Text rich in quote characters, mixed with anything else Unicode has (hypothesis leaves out surrogates).
quote_heavy = st.text(st.sampled_from(list("\"'“”a O!中🎩\n\t\x00")) | st.characters(), max_size=200)
slow = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # model calls


@given(sides, sides, levels)
def test_resize_is_valid_or_refused_only_when_needed(width, height, level):
    ratio = width / height
    extreme = max(ratio, 1 / ratio)
    try:
        w, h = size_for_level(width, height, level)
    except ValueError as err:
        assert "too extreme" in str(err)
        assert extreme > MAX_ASPECT_RATIO or level / math.sqrt(extreme) < MULTIPLE  # a side would be < 16
        return
    assert extreme <= MAX_ASPECT_RATIO
    assert w % MULTIPLE == 0 and h % MULTIPLE == 0 and min(w, h) >= MULTIPLE
    # Area: never below level² by more than one 16-pixel step per side, never above it by more than the
    # rounding up of each side (ceil) costs.
    assert (w + MULTIPLE - 1) * (h + MULTIPLE - 1) >= level * level
    assert w * h <= level * level + 2 * level + max(w, h) + 17
    # Aspect: within one 16-pixel step (plus the ceil's pixel) of the input's.
    assert (w - 1) / (h + MULTIPLE) <= ratio <= (w + MULTIPLE) / (h - 1)


@given(sides, sides, levels)
def test_size_level_never_refuses_a_fitting_image(width, height, level):
    extreme = max(width / height, height / width)
    assume(extreme <= MAX_ASPECT_RATIO and level / math.sqrt(extreme) >= MULTIPLE)
    size_for_level(width, height, level)


@given(st.integers(1, 300), st.integers(1, 300))
def test_restore_size_gives_back_the_exact_size(width, height):
    assert restore_size(Image.new("RGB", (17, 9)), (width, height)).size == (width, height)


@pytest.fixture(scope="module")
def embedder(pipe):
    return pipe.embedder


@settings(slow, max_examples=40)
@given(short=st.integers(1, 400), ratio=st.floats(1, MAX_ASPECT_RATIO), level=st.sampled_from([16, 48, 256, 1024]),
       tall=st.booleans())
def test_qwen_takes_every_working_size_the_resize_allows(embedder, short, ratio, level, tall):
    size = (short, max(1, round(short * ratio)))
    width, height = size if tall else size[::-1]
    try:
        working = size_for_level(width, height, level)
    except ValueError:
        assume(False)
    vision = embedder.image_processor(images=[processor_sized_image(Image.new("RGB", working), embedder.image_processor, embedder.behaviour.resize)],
                                      return_tensors="pt")
    assert int(vision["image_grid_thw"].prod()) > 0


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    with resources.as_file(resources.files("step1x_core.qwen") / "assets" / "qwen25_tokenizer") as folder:
        return AutoTokenizer.from_pretrained(str(folder))


def _normalised(text: str) -> str:
    return text.replace("“", '"').replace("”", '"').replace("'", '"')


@settings(max_examples=300)
@given(quote_heavy)
def test_split_quoted_round_trips(instruction):
    text = templated_prompt(instruction)
    pieces = split_quoted(text)
    assert "".join(p[1] if p.startswith("“") else p for p in pieces) == _normalised(text)
    assert all(len(p) == 3 and p.endswith("”") for p in pieces if p.startswith("“"))  # one character each


@settings(slow, max_examples=60)
@given(quote_heavy)
def test_quote_aware_ids_never_crash_and_decode_to_the_text(tokenizer, instruction):
    text = templated_prompt(instruction)
    ids = quote_aware_ids(tokenizer, text)
    # The tokenizer NFC-normalises each piece it is given; the “ ” around a quoted character are dropped
    # from the ids when they stay tokens of their own, and kept when they merge with it.
    expected = "".join(unicodedata.normalize("NFC", p) for p in split_quoted(text)).translate(CURLY)
    assert tokenizer.decode(ids).translate(CURLY) == expected


@settings(slow, max_examples=25)
@given(quote_heavy)
def test_embedder_ids_never_crash(embedder, instruction):
    ids = embedder.token_ids(instruction, torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert ids.ndim == 1 and ids.numel() > DROP_TOKENS
