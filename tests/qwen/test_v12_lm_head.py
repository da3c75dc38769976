"""v1.2's thinker writes text, so it needs the LM head the Qwen loaders normally drop (1.1 GB in the 7B).

``keep_lm_head=True`` keeps it from a Hugging Face folder, and takes it from a single file that holds it
(or ties it to the embeddings when the config says so); ComfyUI's single files leave it out, which gets
an error naming the fix. The default stays: no head.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from step1x_core.qwen.folder import QwenFolderError, load_qwen_folder
from step1x_core.qwen.single_file import QwenFileError, load_qwen_file
from step1x_core.reasoning.qwen_chat import QwenChat
from step1x_core.testing.tiny_qwen import (comfy_single_file_tensors, tiny_qwen_config, tiny_qwen_state_dict,
                                           write_comfy_single_file, write_tiny_qwen)
from tests.release_names import QWEN_FOLDER, QWEN_FP8_FILE


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return tiny_qwen_state_dict(seed=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, weights):
    return write_tiny_qwen(tmp_path_factory.mktemp("qwen") / QWEN_FOLDER, state_dict=weights)


def test_v12_folder_keeps_the_lm_head_on_request(folder, weights):
    assert isinstance(load_qwen_folder(folder, torch.float32)[0].lm_head, torch.nn.Identity)
    model = load_qwen_folder(folder, torch.float32, keep_lm_head=True)[0]
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"].float())


def test_v12_folder_without_lm_head_is_refused_when_it_is_needed(tmp_path, weights):
    headless = write_tiny_qwen(tmp_path / "headless", state_dict={k: v for k, v in weights.items()
                                                                   if not k.startswith("lm_head.")})
    assert isinstance(load_qwen_folder(headless, torch.float32)[0].lm_head, torch.nn.Identity)  # encoding: fine
    with pytest.raises(QwenFolderError, match="lm_head.weight"):
        load_qwen_folder(headless, torch.float32, keep_lm_head=True)


def test_v12_single_file_with_lm_head_keeps_it(tmp_path, weights, folder):
    path = write_comfy_single_file(tmp_path / "with_head.safetensors", dict(weights), tiny_qwen_config())
    assert isinstance(load_qwen_file(path, torch.float32).lm_head, torch.nn.Identity)
    model = load_qwen_file(path, torch.float32, keep_lm_head=True)
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"].float())
    # It writes the same seeded answer as the folder's model (given the folder's generation_config.json,
    # which a single file does not carry).
    reference, tokenizer, image_processor = load_qwen_folder(folder, torch.float32, keep_lm_head=True)
    model.generation_config = reference.generation_config
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    answers = [QwenChat(m, tokenizer, image_processor, seed=5, max_new_tokens=3).chat("Be brief.", [image, "What?"])
               for m in (model, reference)]
    assert answers[0] == answers[1]


def test_v12_comfyui_single_file_has_no_lm_head_to_keep(tmp_path, weights):
    tensors = comfy_single_file_tensors(weights, fp8_scaled=True)
    path = write_comfy_single_file(tmp_path / QWEN_FP8_FILE, tensors, tiny_qwen_config())
    with pytest.raises(QwenFileError, match=r"no lm_head\.weight.*Hugging Face folder"):
        load_qwen_file(path, torch.float32, keep_lm_head=True)


def test_v12_single_file_ties_the_head_when_the_config_does(tmp_path, weights):
    config = {**tiny_qwen_config(), "tie_word_embeddings": True}
    path = write_comfy_single_file(tmp_path / "tied.safetensors", comfy_single_file_tensors(weights), config)
    model = load_qwen_file(path, torch.float32, keep_lm_head=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
