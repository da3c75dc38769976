"""Prompt construction of the Qwen-VL embedder: prefix, chat layout, quote-aware ids, image preparation,
the 217-token cut and the 640-token limit. Ids are pinned with the real Qwen2.5 tokenizer."""

from __future__ import annotations

import hashlib
import logging
from importlib import resources
from pathlib import Path

import pytest
import torch
from PIL import Image

from step1x_core.qwen.embedder import QwenVLEmbedder
from step1x_core.qwen.prompt import (DROP_TOKENS, MAX_LENGTH, QWEN_PREFIX, chat_messages, quote_aware_ids,
                                     split_quoted, templated_prompt)
from step1x_core.qwen.transformers_versions import AS_TRANSFORMERS_4_49, AS_TRANSFORMERS_5_3
from step1x_core.qwen.vision_input import prepare_vlm_image
from step1x_core.testing.tiny_qwen import QWEN25_VL_CHAT_TEMPLATE, write_tiny_qwen

from tests.golden import golden_dir  # noqa: E402
GOLDEN_TEMPLATE = golden_dir() / "tiny_qwen" / "chat_template.jinja"

VISION_START, VISION_END, IM_END, IM_START, ASSISTANT, NEWLINE = 151652, 151653, 151645, 151644, 77091, 198
GENERATION_TAIL = [IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    with resources.as_file(resources.files("step1x_core.qwen") / "assets" / "qwen25_tokenizer") as folder:
        return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"), seed=0)


@pytest.fixture(scope="module")
def embedder(tiny_folder) -> QwenVLEmbedder:
    return QwenVLEmbedder.from_pretrained(tiny_folder, dtype=torch.float32, behaviour=AS_TRANSFORMERS_5_3)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(1))


def tail_ids(tokenizer, instruction: str) -> list[int]:
    ids = quote_aware_ids(tokenizer, templated_prompt(instruction))
    return ids[ids.index(VISION_END) :]


# ---- prefix and chat layout -------------------------------------------------------------------------


def test_prefix_is_the_official_constant() -> None:
    assert len(QWEN_PREFIX) == 1058
    digest = hashlib.sha256(QWEN_PREFIX.encode("utf-8")).hexdigest()
    assert digest == "40882ddca94ca6971c8d5713d42464afa31dad09236dfacafe3ee26b4b44aa82"
    assert QWEN_PREFIX.endswith("User Prompt:")


def _chat_templates() -> list:
    templates = [pytest.param(QWEN25_VL_CHAT_TEMPLATE, id="hub_chat_template_json")]
    if GOLDEN_TEMPLATE.is_file():  # the one transformers 5 saved with the golden model
        templates.append(pytest.param(GOLDEN_TEMPLATE.read_text(encoding="utf-8"), id="golden_jinja"))
    return templates


@pytest.mark.parametrize("template", _chat_templates())
@pytest.mark.parametrize("vision_id", [True, False])
@pytest.mark.parametrize("instruction", ["add a red hat to the cat", "", 'say "hi"\nnow'])
def test_templated_prompt_equals_chat_template(tokenizer, template, vision_id, instruction) -> None:
    rendered = tokenizer.apply_chat_template(
        chat_messages(instruction),
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
        add_vision_id=vision_id,
    )
    assert templated_prompt(instruction, vision_id=vision_id) == rendered


def test_templated_prompt_layout() -> None:
    text = templated_prompt("do it")
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert QWEN_PREFIX + "Picture 1: <|vision_start|><|image_pad|><|vision_end|>do it<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    # The quotes inside PREFIX sit before index 155, so they never toggle quoting.
    assert [i for i, c in enumerate(text) if c == '"'] == [108, 124]


# ---- quote-aware splitting ----------------------------------------------------------------------------

PAD = "x" * 156  # quotes only count from index 156 on


def test_split_quoted_ignores_quotes_up_to_index_155() -> None:
    assert split_quoted('a "b" c') == ['a "b" c']
    assert split_quoted("x" * 155 + '"ab"') == ["x" * 155 + '"ab"']


def test_split_quoted_wraps_each_quoted_character() -> None:
    assert split_quoted(PAD + 'say "hi" now') == [PAD + 'say "', "“h”", "“i”", '" now']


def test_split_quoted_normalises_curly_quotes_and_apostrophes() -> None:
    assert split_quoted(PAD + "“ab”") == [PAD + '"', "“a”", "“b”", '"']
    assert split_quoted(PAD + "it's") == [PAD + 'it"', "“s”"]


def test_split_quoted_unbalanced_quote_runs_to_the_end() -> None:
    assert split_quoted(PAD + 'a"b c') == [PAD + 'a"', "“b”", "“ ”", "“c”"]


def test_split_quoted_keeps_text_without_quotes_whole() -> None:
    assert split_quoted(PAD + "plain") == [PAD + "plain"]
    assert split_quoted("") == []


# ---- pinned ids (real tokenizer) --------------------------------------------------------------------


def test_ids_plain_text(tokenizer) -> None:
    # add, ' a', ' red', ' hat', ' to', ' the', ' cat' (same as the normal tokenisation)
    assert tail_ids(tokenizer, "add a red hat to the cat") == [
        VISION_END, 718, 264, 2518, 8896, 311, 279, 8251, *GENERATION_TAIL
    ]


def test_ids_ascii_quotes_become_one_token_per_character(tokenizer) -> None:
    # change, ' the', ' sign', ' to', ' "', O, P, E, N, '"' -- 'OPEN' alone would be one token (30933)
    assert tail_ids(tokenizer, 'change the sign to "OPEN"') == [
        VISION_END, 3373, 279, 1841, 311, 330, 46, 47, 36, 45, 1, *GENERATION_TAIL
    ]


def test_ids_chinese_quotes_become_ascii_quotes(tokenizer) -> None:
    # 把, 招牌, 改成, '"', 开, 放, '"' -- normally “ 开放 ” = 2073, 100713, 854
    assert tail_ids(tokenizer, "把招牌改成“开放”") == [
        VISION_END, 99360, 113398, 116893, 1, 29767, 53222, 1, *GENERATION_TAIL
    ]


def test_ids_apostrophe_quotes_the_rest_per_character(tokenizer) -> None:
    # the, ' girl', '"', then everything after the apostrophe, special tokens included, one character at a
    # time; “ ” (a quoted space) tokenises as 2073 + 18987 (' ”'), so its quotes are not stripped.
    assert tail_ids(tokenizer, "the girl's hat") == [
        VISION_END, 1782, 3743, 1,
        82, 2073, 18987, 71, 64, 83,  # s, “ ”, h, a, t
        27, 91, 72, 76, 62, 68, 77, 67, 91, 29, NEWLINE,  # < | i m _ e n d | > \n
        27, 91, 72, 76, 62, 82, 83, 64, 81, 83, 91, 29,  # < | i m _ s t a r t | >
        64, 82, 82, 72, 82, 83, 64, 77, 83, NEWLINE,  # a s s i s t a n t \n
    ]


def test_ids_exclamation_mark_is_id_zero(tokenizer) -> None:
    assert tail_ids(tokenizer, "!") == [VISION_END, 0, *GENERATION_TAIL]


def test_exclamation_mark_is_masked(embedder, image) -> None:
    ids = embedder.token_ids("!", image)
    prepared = embedder.inputs("!", image)
    assert (ids == 0).sum() == 1
    assert torch.equal(prepared.attention_mask[0], (ids > 0).long())
    assert prepared.attention_mask[0, ids.tolist().index(0)] == 0


# ---- full id sequence and the 217-token cut ------------------------------------------------------------


def test_kept_sequence_starts_at_last_prefix_token(embedder, image) -> None:
    ids = embedder.token_ids("add a red hat to the cat", image).tolist()
    # 14 system + 204 PREFIX tokens, then "Picture 1: " and <|vision_start|>; the cut keeps the final ':'.
    assert ids[DROP_TOKENS : DROP_TOKENS + 7] == [25, 24669, 220, 16, 25, 220, VISION_START]
    assert ids.index(VISION_START) == 223
    image_tokens = ids.count(151655)
    assert ids[224 : 224 + image_tokens] == [151655] * image_tokens
    grid = embedder.inputs("x", image).image_grid_thw[0]
    assert image_tokens == int(grid.prod()) // 4


def test_transformers_4_49_prompt_has_no_picture_label(tiny_folder, image) -> None:
    embedder = QwenVLEmbedder.from_pretrained(tiny_folder, dtype=torch.float32, behaviour=AS_TRANSFORMERS_4_49)
    ids = embedder.token_ids("add a red hat to the cat", image).tolist()
    assert ids[DROP_TOKENS : DROP_TOKENS + 3] == [25, VISION_START, 151655]


def test_long_instruction_is_cut_to_640_with_a_warning(embedder, image, caplog) -> None:
    instruction = " ".join(["red"] * 700)  # 700 tokens
    total = len(embedder.token_ids(instruction, image))
    with caplog.at_level(logging.WARNING, logger="step1x_core.qwen.embedder"):
        encoded = embedder([instruction], [image])
    dropped = total - DROP_TOKENS - MAX_LENGTH
    assert dropped > 0
    assert int(encoded.mask.sum()) == MAX_LENGTH and encoded.hidden.shape[1] == MAX_LENGTH
    assert encoded.dropped_tokens == (dropped,)
    assert any(f"{dropped} tokens dropped" in r.getMessage() for r in caplog.records), caplog.text


def test_short_instruction_does_not_warn(embedder, image, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="step1x_core.qwen.embedder"):
        encoded = embedder(["add a hat"], [image])
    assert encoded.dropped_tokens == (0,)
    assert not caplog.records


# ---- image preparation ----------------------------------------------------------------------------------


def test_tensor_to_pil_truncates_like_to_pil_image() -> None:
    tensor = torch.full((3, 56, 56), 0.999)  # 254.745 -> 254: truncated, not rounded
    tensor[:, :28] = 0.5  # 127.5 -> 127
    image = prepare_vlm_image(tensor)  # 56 x 56 is already a multiple of 28: no resize
    assert image.size == (56, 56) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (127, 127, 127)
    assert image.getpixel((0, 55)) == (254, 254, 254)


@pytest.mark.parametrize(
    ("height", "width", "expected_wh"),
    [(200, 280, (280, 196)), (1024, 1024, (1036, 1036)), (768, 1360, (1372, 756)), (56, 84, (84, 56))],
)
def test_first_resize_rounds_to_multiples_of_28(height, width, expected_wh) -> None:
    assert prepare_vlm_image(torch.zeros(3, height, width)).size == expected_wh


@pytest.mark.parametrize(
    ("height", "width", "grid", "image_tokens"),
    [(1024, 1024, [1, 36, 36], 324), (768, 1360, [1, 26, 48], 312), (200, 280, [1, 28, 40], 280)],
)
def test_image_token_count(embedder, height, width, grid, image_tokens) -> None:
    # Spec examples: 1024^2 -> 504 x 504 -> 324 tokens; DiT size 1360 x 768 -> 672 x 364 -> 312 tokens.
    image = torch.zeros(3, height, width)
    assert embedder.inputs("x", image).image_grid_thw[0].tolist() == grid
    assert int((embedder.token_ids("x", image) == 151655).sum()) == image_tokens


def test_pil_input_is_converted_to_rgb() -> None:
    image = prepare_vlm_image(Image.new("L", (100, 60), color=7))
    assert image.mode == "RGB" and image.size == (112, 56)
