"""Loading Qwen2.5-VL folders: the tiny model in the real Hub layout, and clear errors for bad folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from step1x_core.qwen.embedder import QwenVLEmbedder
from step1x_core.qwen.folder import QwenFolderError
from step1x_core.qwen.prompt import DROP_TOKENS, MAX_LENGTH
from step1x_core.testing.tiny_qwen import write_tiny_qwen
from tests.release_names import QWEN_FOLDER

HUB_FILES = {
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "chat_template.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"), seed=0)


@pytest.fixture(scope="module")
def embedder(tiny_folder) -> QwenVLEmbedder:
    return QwenVLEmbedder.from_pretrained(tiny_folder, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(3, 120, 160, generator=torch.Generator().manual_seed(3))


# ---- the tiny model in the Hub layout ---------------------------------------------------------------


def test_tiny_folder_has_the_hub_layout(tiny_folder) -> None:
    names = {p.name for p in tiny_folder.iterdir()}
    assert names == HUB_FILES | {"model.safetensors"}
    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and "text_config" not in config  # flat 4.49-era config
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    preprocessor = json.loads((tiny_folder / "preprocessor_config.json").read_text())
    assert (preprocessor["min_pixels"], preprocessor["max_pixels"]) == (3136, 12845056)
    keys = set(load_file(str(tiny_folder / "model.safetensors")))
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= keys
    assert "visual.merger.mlp.2.weight" in keys and not any(k.startswith("model.language_model") for k in keys)


def test_round_trip_shapes_and_masks(embedder, image) -> None:
    encoded = embedder.encode_with_negative("add a red hat to the cat", image)
    embs, masks = encoded.hidden, encoded.mask
    assert embs.shape == (2, MAX_LENGTH, 64) and embs.dtype == torch.float32
    assert masks.shape == (2, MAX_LENGTH) and masks.dtype == torch.long
    for row, instruction in enumerate(["add a red hat to the cat", ""]):
        kept = len(embedder.token_ids(instruction, image)) - DROP_TOKENS
        assert masks[row].tolist() == [1] * kept + [0] * (MAX_LENGTH - kept)
        assert torch.isfinite(embs[row]).all()
        assert torch.count_nonzero(embs[row, kept:]) == 0
        assert (embs[row, :kept].norm(dim=-1) > 0).all()
    # The image and everything before it come first (causal attention): same for cond and uncond.
    torch.testing.assert_close(embs[0, :5], embs[1, :5])
    assert not torch.allclose(embs[0], embs[1])


def test_mrope_positions_follow_transformers_4(embedder, image) -> None:
    """The default (transformers 4.49) behaviour: 3-D positions for the image, masked "!" tokens left at
    position 1 and skipped when counting, text after the image continuing at image start + max(h, w)."""
    prepared = embedder.inputs("pop! now", image)
    positions = embedder.position_ids(prepared)[:, 0]  # [3, L]
    ids = prepared.input_ids[0]
    start = int((ids == 151655).nonzero()[0])
    grid_h, grid_w = (prepared.image_grid_thw[0, 1:] // 2).tolist()
    end = start + grid_h * grid_w
    assert torch.equal(positions[:, :start], torch.arange(start).expand(3, -1))
    assert positions[0, start:end].eq(start).all()
    assert torch.equal(positions[1, start:end], start + torch.arange(grid_h).repeat_interleave(grid_w))
    assert torch.equal(positions[2, start:end], start + torch.arange(grid_w).repeat(grid_h))
    text, masked = positions[:, end:], ids[end:] == 0
    assert int(masked.sum()) == 1 and text[:, masked].eq(1).all()
    expected = start + max(grid_h, grid_w) + torch.arange(int((~masked).sum()))
    assert torch.equal(text[:, ~masked], expected.expand(3, -1))


def test_batch_call_equals_single_calls(embedder, image) -> None:
    both, single = embedder(["a", "b c"], [image, image]), embedder(["b c"], [image])
    embs, masks, single_embs, single_masks = both.hidden, both.mask, single.hidden, single.mask
    torch.testing.assert_close(embs[1:], single_embs, rtol=0, atol=0)
    assert torch.equal(masks[1:], single_masks)


def test_writer_is_deterministic(tmp_path, tiny_folder) -> None:
    again = write_tiny_qwen(tmp_path / "again", seed=0)
    other = write_tiny_qwen(tmp_path / "other", seed=1)
    original = (tiny_folder / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == original
    assert (other / "model.safetensors").read_bytes() != original
    assert (again / "tokenizer.json").read_bytes() == (tiny_folder / "tokenizer.json").read_bytes()


def test_sharded_checkpoint_loads_the_same_model(tmp_path, embedder, image) -> None:
    folder = write_tiny_qwen(tmp_path / "sharded", seed=0, shards=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)}
    sharded = QwenVLEmbedder.from_pretrained(folder, dtype=torch.float32)
    expected = embedder(["make it blue"], [image]).hidden
    got = sharded(["make it blue"], [image]).hidden
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_missing_tensor_is_an_error_not_a_random_init(tmp_path, tiny_folder) -> None:
    folder = tmp_path / "incomplete"
    shutil.copytree(tiny_folder, folder)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QwenFolderError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        QwenVLEmbedder.from_pretrained(folder, dtype=torch.float32)


# ---- folder errors --------------------------------------------------------------------------------------


def make_folder(root: Path, model_type: str = "qwen2_5_vl", files: tuple[str, ...] = ()) -> Path:
    """A folder that looks like a model folder to the checks (content of the named files is irrelevant)."""
    folder = root / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    for name in files:
        (folder / name).write_text("{}")
    return folder


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def test_missing_path(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(QwenFolderError, match="does not exist") as error:
        QwenVLEmbedder.from_pretrained(missing)
    assert str(missing) in str(error.value) and QWEN_FOLDER in str(error.value)


def test_missing_config(tmp_path) -> None:
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(QwenFolderError, match="no config.json") as error:
        QwenVLEmbedder.from_pretrained(folder)
    assert "model.safetensors" in str(error.value)  # says what it found instead


def test_qwen2_vl_is_rejected_by_name(tmp_path) -> None:
    folder = make_folder(tmp_path, "qwen2_vl", TOKENIZER_FILES + ("model.safetensors",))
    with pytest.raises(QwenFolderError, match=r"found qwen2_vl \(Qwen2-VL\)") as error:
        QwenVLEmbedder.from_pretrained(folder)
    assert "needs Qwen2.5-VL-7B-Instruct" in str(error.value) and str(folder) in str(error.value)


def test_missing_tokenizer_files_are_named(tmp_path) -> None:
    folder = make_folder(tmp_path, files=("tokenizer_config.json", "vocab.json", "model.safetensors"))
    with pytest.raises(QwenFolderError, match="lacks tokenizer file") as error:
        QwenVLEmbedder.from_pretrained(folder)
    missing_part = str(error.value).split("lacks tokenizer file(s): ")[1].split(" (found:")[0]
    assert missing_part == "tokenizer.json (or vocab.json + merges.txt; missing merges.txt)"


def test_vocab_and_merges_replace_tokenizer_json(tmp_path) -> None:
    folder = make_folder(tmp_path, files=("tokenizer_config.json", "vocab.json", "merges.txt"))
    with pytest.raises(QwenFolderError, match="no model weights"):  # tokenizer check passed
        QwenVLEmbedder.from_pretrained(folder)


def test_missing_weights(tmp_path) -> None:
    folder = make_folder(tmp_path, files=TOKENIZER_FILES)
    with pytest.raises(QwenFolderError, match="no model weights") as error:
        QwenVLEmbedder.from_pretrained(folder)
    assert "model.safetensors.index.json" in str(error.value)


def test_missing_shard_is_named(tmp_path) -> None:
    folder = make_folder(tmp_path, files=TOKENIZER_FILES + ("model-00001-of-00002.safetensors",))
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(QwenFolderError, match="model-00002-of-00002.safetensors"):
        QwenVLEmbedder.from_pretrained(folder)


@pytest.mark.parametrize("version, vision_id, resize, positions", [
    ("4.49.0", False, "pil", "mrope"),  # the official pin
    ("4.52.4", True, "pil", "mrope"),
    ("4.57.1", True, "torch", "mrope"),
    ("5.23.0", True, "torch", "sequential"),
])
def test_behaviour_follows_the_transformers_version(version, vision_id, resize, positions):
    from step1x_core.qwen.transformers_versions import behaviour_for_transformers

    behaviour = behaviour_for_transformers(version)
    assert (behaviour.vision_id, behaviour.resize, behaviour.positions) == (vision_id, resize, positions)
