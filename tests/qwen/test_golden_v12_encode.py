"""v1.2 prompt encoding against the reference's encode_prompt: templated text, special-token and quote split,
token ids, masks, 3-D positions and txt_ids exactly; embeddings and raw text embeddings within 1e-5."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from step1x_core.qwen.embedder import QwenVLEmbedder
from step1x_core.qwen.embedder_v12 import QwenV12Embedder
from step1x_core.qwen.positions_v12 import mrope_positions
from step1x_core.qwen.prompt_v12 import special_tokens, split_pieces, templated_prompt_v12
from step1x_core.commands.bench_measure import relative_error
from tests.golden_v12 import FORWARD_TOLERANCE, golden_v12_dir, max_relative, qwen_folder, read, sets, stem

SUFFIX = "_encode.safetensors"
ENCODE_SETS = sets(SUFFIX)


def test_v12_golden_encode_sets_present():
    if not ENCODE_SETS:
        pytest.skip(f"no v1.2 golden vectors in {golden_v12_dir()} (set STEP1X_GOLDEN_V12_DIR)")


@pytest.fixture(scope="module", params=ENCODE_SETS, ids=lambda p: stem(p, SUFFIX))
def encode_case(request):
    tensors, about = read(request.param)
    weights = qwen_folder(stem(request.param, SUFFIX))
    embedder = QwenV12Embedder.from_embedder(QwenVLEmbedder.from_pretrained(weights, dtype=torch.float32))
    image = Image.open(golden_v12_dir() / f"{stem(request.param, SUFFIX)}_image.png").convert("RGB")
    return embedder, image, tensors, about


def test_v12_prompt_text_and_pieces_are_the_references(encode_case):
    embedder, _, _, about = encode_case
    for prompt in about["prompts"]:
        text = templated_prompt_v12(prompt["prompt"])
        assert text == prompt["templated_text"], prompt["key"]
        pieces = split_pieces(text, special_tokens(embedder.tokenizer))
        assert [list(p) for p in pieces] == prompt["split_pieces"], prompt["key"]


def test_v12_encoding_matches_the_reference(encode_case):
    embedder, image, tensors, about = encode_case
    for prompt in about["prompts"]:
        key = prompt["key"]
        encoding = embedder(prompt["prompt"], image)
        assert torch.equal(encoding.input_ids, tensors[f"{key}.input_ids"]), key
        ids = encoding.input_ids[0]
        grid = tuple(int(v) for v in tensors[f"{key}.image_grid_thw"][0])
        positions = mrope_positions(ids.tolist(), (ids > 0).tolist(), grid, embedder.image_token_id)
        assert torch.equal(positions, tensors[f"{key}.position_ids"][:, 0]), key
        assert torch.equal(encoding.text_mask, tensors[f"{key}.text_masks"]), key
        assert torch.equal(encoding.txt_ids[0], tensors[f"{key}.txt_ids"]), key
        for ours, name in ((encoding.hidden, "embedding"), (encoding.text_embeds, "text_embeds")):
            expected = tensors[f"{key}.{name}"]
            error = max(relative_error(ours, expected), max_relative(ours, expected))
            assert error <= FORWARD_TOLERANCE, f"{key}.{name}: {error:.2e} from the reference"


def test_quoted_characters_are_flagged(encode_case):
    """The public set's p1 has "OPEN" and "SHUT": eight quoted characters, one token each."""
    embedder, image, tensors, about = encode_case
    for prompt in about["prompts"]:
        assert int(tensors[f"{prompt['key']}.text_masks"].sum()) == prompt["quoted_tokens"]
