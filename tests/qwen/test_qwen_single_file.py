"""ComfyUI's single-file Qwen2.5-VL (bf16 and fp8 scaled) against the Hugging Face folder path.

The tiny Qwen2.5-VL is saved both ways from the same weights: the single file must give the very same
hidden states as the folder. The fp8-scaled file is compared with a folder holding its dequantised weights
(weight = fp8 * scale). Layout recognition is tested on headers alone (meta tensors), so the real 7B and 3B
shapes are checked without 16 GB files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from step1x_core.ops import ScaledFp8Linear
from step1x_core.qwen.embedder import QwenVLEmbedder
from step1x_core.qwen.folder import QwenFolderError
from step1x_core.qwen.single_file import (
    QwenFileError,
    build_skeleton,
    check_architecture,
    check_qwen25_vl_7b,
    check_scales,
    hub_name,
    load_qwen_file,
    qwen_config,
    read_layout,
)
from step1x_core.testing.tiny_qwen import (
    comfy_single_file_tensors,
    dequantize_scaled_fp8,
    tiny_qwen_config,
    tiny_qwen_state_dict,
    write_comfy_single_file,
    write_tiny_qwen,
    write_tiny_qwen_file,
)
from tests.release_names import QWEN_FILE, QWEN_FOLDER, QWEN_FP8_FILE, V11_DIT

INSTRUCTIONS = ["make the sky red", 'write "OK" on the sign']


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen_single_file")
    fp8_file = write_tiny_qwen_file(root / QWEN_FP8_FILE, fp8_scaled=True)
    return {
        "folder": write_tiny_qwen(root / QWEN_FOLDER),
        "bf16": write_tiny_qwen_file(root / QWEN_FILE),
        "fp8": fp8_file,
        "dequantized": write_tiny_qwen(root / "dequantized", state_dict=dequantize_scaled_fp8(load_file(str(fp8_file)))),
    }


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(3, 80, 120, generator=torch.Generator().manual_seed(3))


def _embed(path: Path, dtype: torch.dtype, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    embedder = QwenVLEmbedder.from_pretrained(path, dtype=dtype)
    encoded = embedder(INSTRUCTIONS, [image] * len(INSTRUCTIONS))
    return encoded.hidden, encoded.mask


@pytest.mark.parametrize("source, reference", [("bf16", "folder"), ("fp8", "dequantized")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_single_file_equals_the_folder_of_the_same_weights(files, image, dtype, source, reference) -> None:
    """The bf16 file equals the Hugging Face folder; the fp8-scaled file equals a folder holding its
    dequantised weights (weight = fp8 * scale)."""
    expected_embs, expected_masks = _embed(files[reference], dtype, image)
    embs, masks = _embed(files[source], dtype, image)
    assert torch.equal(masks, expected_masks)
    assert torch.equal(embs, expected_embs)


def test_per_row_scales_load_like_their_dequantized_weights(tmp_path, image) -> None:
    """Scales may also come one per output row; they are applied per row, not across the input features."""
    weights = tiny_qwen_state_dict()
    tensors = comfy_single_file_tensors(weights, fp8_scaled=True)
    for layer in ("model.layers.0.mlp.up_proj", "visual.blocks.1.attn.qkv"):
        weight = weights[layer + ".weight"].float()
        row_scale = weight.abs().amax(dim=1) / 448
        tensors[layer + ".weight"] = (weight / row_scale[:, None]).to(torch.float8_e4m3fn)
        tensors[layer + ".scale_weight"] = row_scale
    single_file = write_comfy_single_file(tmp_path / "rows.safetensors", tensors, tiny_qwen_config())
    dequantized = dequantize_scaled_fp8(tensors)
    for layer in ("model.layers.0.mlp.up_proj", "visual.blocks.1.attn.qkv"):  # written out, independently
        dequantized[layer + ".weight"] = tensors[layer + ".weight"].float() * tensors[layer + ".scale_weight"][:, None]
        error = (dequantized[layer + ".weight"] - weights[layer + ".weight"].float()).norm()
        assert error < 0.07 * weights[layer + ".weight"].float().norm()  # e4m3 rounding, nothing worse
    folder = write_tiny_qwen(tmp_path / "rows_dequantized", state_dict=dequantized)
    assert torch.equal(_embed(single_file, torch.float32, image)[0], _embed(folder, torch.float32, image)[0])


def test_fp8_storage_changes_the_embeddings(files, image) -> None:
    """So the fp8 comparison above is not vacuous: 10.6% on this tiny random model (float32)."""
    fp8, bf16 = _embed(files["fp8"], torch.float32, image)[0], _embed(files["folder"], torch.float32, image)[0]
    assert 0.01 < float((fp8 - bf16).norm() / bf16.norm()) < 0.5


def test_fp8_weights_stay_fp8_in_memory(files) -> None:
    model = load_qwen_file(files["fp8"], dtype=torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    scaled = [m for m in linears if isinstance(m, ScaledFp8Linear)]
    # every Linear of the LLM and the vision tower, i.e. every one the file stores in fp8
    assert len(scaled) == len(linears) > 0
    assert all(m.weight.dtype == torch.float8_e4m3fn and m.scale_weight.dtype == torch.float32 for m in scaled)
    file_bytes = sum(t.numel() * t.element_size() for t in load_file(str(files["fp8"])).values())
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert model_bytes <= 1.01 * file_bytes, (model_bytes, file_bytes)  # no upcast copy anywhere


@pytest.mark.parametrize("source", ["folder", "fp8"])
def test_the_unused_lm_head_takes_no_memory(files, source) -> None:
    model = QwenVLEmbedder.from_pretrained(files[source], dtype=torch.float32).model
    assert isinstance(model.lm_head, torch.nn.Identity)
    assert not any("lm_head" in name for name, _ in model.named_parameters())


def test_single_file_moves_between_devices_without_meta_tensors(files) -> None:
    embedder = QwenVLEmbedder.from_pretrained(files["fp8"], dtype=torch.float32, device="cpu")
    assert not any(t.is_meta for t in [*embedder.model.parameters(), *embedder.model.buffers()])
    assert embedder.dtype == torch.float32 and embedder.to("meta").device.type == "meta"


def test_transformers5_names_and_a_wrapper_prefix_load_the_same_model(tmp_path, files, image) -> None:
    """A file saved with transformers >= 4.52 names (model.language_model.*, model.visual.*) and one whose keys
    sit under a prefix (as some tools save text encoders) are the same model."""
    renamed = {}
    for name, tensor in comfy_single_file_tensors(tiny_qwen_state_dict()).items():
        if name.startswith("visual."):
            renamed["model." + name] = tensor
        else:
            renamed[name.replace("model.", "model.language_model.", 1)] = tensor
    prefixed = {"qwen25_7b.transformer." + k: v for k, v in comfy_single_file_tensors(tiny_qwen_state_dict()).items()}
    reference = _embed(files["bf16"], torch.float32, image)[0]
    for label, tensors in (("t5_names", renamed), ("prefixed", prefixed)):
        path = write_comfy_single_file(tmp_path / f"{label}.safetensors", tensors, tiny_qwen_config())
        assert torch.equal(_embed(path, torch.float32, image)[0], reference), label


def test_hub_name_maps_both_transformers_layouts() -> None:
    assert hub_name("model.language_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert hub_name("model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert hub_name("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"


# --------------------------------------------------------------------------------------------------------
# The real sizes, from headers alone
# --------------------------------------------------------------------------------------------------------


def _header(config: dict | None = None, fp8_scaled: bool = False) -> dict[str, torch.Tensor]:
    """Meta tensors named and shaped like ComfyUI's file for ``config`` (default: the packaged 7B config)."""
    layout_config = qwen_config(read_layout({}, {"config": json.dumps(config)} if config else None))
    model = build_skeleton(layout_config, torch.bfloat16)
    header = {}
    for key, tensor in model.state_dict().items():
        name = hub_name(key)
        if fp8_scaled and tensor.ndim == 2 and "embed_tokens" not in name:
            header[name] = torch.empty(tensor.shape, dtype=torch.float8_e4m3fn, device="meta")
            header[name.removesuffix(".weight") + ".scale_weight"] = torch.empty((), device="meta")
        else:
            header[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if fp8_scaled:
        header["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn, device="meta")
    return header


@pytest.fixture(scope="module")
def header_7b() -> dict[str, torch.Tensor]:
    return _header(fp8_scaled=True)


@pytest.fixture(scope="module")
def skeleton_7b() -> torch.nn.Module:
    return build_skeleton(qwen_config(read_layout({})), torch.bfloat16)


def test_comfyui_7b_fp8_layout_is_accepted(header_7b, skeleton_7b) -> None:
    layout = read_layout(header_7b)
    # 28 layers x 7 + 32 vision blocks x 5 + the merger's 2: the 358 scaled Linears of ComfyUI's file
    assert len(layout.scales) == len(layout.fp8_names) == 358
    assert layout.shape("model.embed_tokens.weight") == (152064, 3584)
    check_qwen25_vl_7b(layout, QWEN_FP8_FILE)
    check_scales(layout)
    check_architecture(layout, skeleton_7b)
    params = sum(t.numel() for t in layout.weights.values())
    assert params == 8_292_166_656 - 152064 * 3584  # Qwen2.5-VL-7B-Instruct's count, less its lm_head


QWEN25_VL_3B = {
    **tiny_qwen_config(),
    "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
    "num_key_value_heads": 2, "vocab_size": 151936,
    "vision_config": {**tiny_qwen_config()["vision_config"], "depth": 1, "out_hidden_size": 2048},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


@pytest.mark.parametrize("with_config", [False, True], ids=["comfyui_file", "declares_its_config"])
def test_qwen25_vl_3b_of_omnigen2_is_named(with_config) -> None:
    header = _header(QWEN25_VL_3B)
    layout = read_layout(header, {"config": json.dumps(QWEN25_VL_3B)} if with_config else None)
    with pytest.raises(QwenFileError, match="Qwen2.5-VL-3B.*OmniGen2.*needs|Qwen2.5-VL-3B.*OmniGen2.*trained with"):
        check_qwen25_vl_7b(layout, "qwen_2.5_vl_fp16.safetensors")


def test_text_only_qwen_is_named(header_7b) -> None:
    text_only = {k: v for k, v in header_7b.items() if not k.startswith("visual.")}
    with pytest.raises(QwenFileError, match="no vision tower"):
        check_qwen25_vl_7b(read_layout(text_only))


def _minimal(*names: str) -> dict[str, torch.Tensor]:
    return {name: torch.empty(4, 4, device="meta") for name in names}


@pytest.mark.parametrize("names, kind", [
    (("double_blocks.0.img_attn.qkv.weight", "connector.proj.weight"), "Step1X-Edit DiT"),
    (("encoder.conv_in.weight", "decoder.conv_in.weight"), "VAE"),
    (("text_model.encoder.layers.0.mlp.fc1.weight",), "CLIP"),
    (("encoder.block.0.layer.0.SelfAttention.k.weight", "shared.weight"), "T5"),
    (("model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight"), "Qwen3"),
    (("model.embed_tokens.weight", "model.layers.0.post_feedforward_layernorm.weight"), "Gemma"),
    (("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight"), "Llama"),
    (("some.other.weight",), "no Qwen2.5-VL tensors"),
])
def test_other_models_are_named(names, kind) -> None:
    with pytest.raises(QwenFileError, match=kind) as error:
        check_qwen25_vl_7b(read_layout(_minimal(*names)))
    assert QWEN_FOLDER in str(error.value)  # and the fix


def test_one_shard_of_a_folder_is_named(header_7b) -> None:
    with pytest.raises(QwenFileError, match="one shard.*folder"):
        check_qwen25_vl_7b(read_layout(header_7b), "model-00001-of-00005.safetensors")


def test_missing_and_misshaped_tensors_are_listed(header_7b, skeleton_7b) -> None:
    broken = {k: v for k, v in header_7b.items() if not k.startswith("model.layers.27.mlp.")}
    broken["model.norm.weight"] = torch.empty(100, device="meta")
    with pytest.raises(QwenFileError, match=r"lacks 3 tensor.*model\.layers\.27\.mlp.*wrong shape.*model\.norm"):
        check_architecture(read_layout(broken), skeleton_7b)


def test_block_wise_and_integer_quantisation_are_refused(header_7b) -> None:
    blockwise = dict(header_7b)
    blockwise["model.layers.0.mlp.up_proj.scale_weight"] = torch.empty(148, 28, device="meta")
    with pytest.raises(QwenFileError, match="block-wise"):
        check_scales(read_layout(blockwise))
    integer = dict(header_7b)
    integer["model.layers.0.mlp.up_proj.weight"] = torch.empty(18944, 3584, dtype=torch.int8, device="meta")
    with pytest.raises(QwenFileError, match="integer"):
        check_scales(read_layout(integer))


# --------------------------------------------------------------------------------------------------------
# Whole files through the embedder's entry point
# --------------------------------------------------------------------------------------------------------


def test_a_dit_file_in_the_qwen_slot_is_named(tmp_path) -> None:
    path = tmp_path / V11_DIT
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2), "connector.x.weight": torch.zeros(1)},
              str(path))
    with pytest.raises(QwenFileError, match=r"^step1x-edit-v1p1-official\.safetensors: is the Step1X-Edit DiT"):
        QwenVLEmbedder.from_pretrained(path)


@pytest.mark.parametrize("content, found", [(b"", "empty"), (b"<!DOCTYPE html><html>", "HTML page")])
def test_unreadable_single_file_says_what_it_is(tmp_path, content, found) -> None:
    path = tmp_path / QWEN_FP8_FILE
    path.write_bytes(content)
    with pytest.raises(QwenFileError, match=found) as error:
        QwenVLEmbedder.from_pretrained(path)
    assert path.name in str(error.value)


def test_file_errors_are_qwen_loading_errors() -> None:
    """Callers that catch the folder error (ValueError) also catch the single-file one."""
    assert issubclass(QwenFileError, ValueError) and issubclass(QwenFolderError, ValueError)
