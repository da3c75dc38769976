"""Every model file against what its model needs, before anything is built: names, shapes, dtypes, the config's
layer counts and widths, and whether the text encoder fits the DiT's connector.

One verdict per file everywhere (Python API, command line, ComfyUI), one line per message, naming the file, the
tensor, what was found, what was expected, and the fix.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from step1x_core.commands.cli import main
from step1x_core.dit.checkpoint import CheckpointError
from step1x_core.dit.loading import load_dit
from step1x_core.pipeline import Step1XEditPipeline
from step1x_core.qwen.embedder import QwenVLEmbedder
from step1x_core.testing.tiny_dit import original_to_diffusers, tiny_dit_params, write_tiny_dit
from step1x_core.vae.loader import VAEFileError, load_vae
from tests.robustness.helpers import CAT, graph, one_error_line, run_error, tiny_dit_file_state
from tests.release_names import QWEN_FILE, QWEN_FOLDER as QWEN, QWEN_FP8_FILE, V11_DIT, VAE

QUICK = ["--size-level", "32", "--steps", "1", "--cfg", "1", "--quiet"]


def _changed(sd: dict, **changes) -> dict:
    out = dict(sd)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del out[key]
        else:
            out[key] = value
    return out


def _renamed(sd: dict, old: str, new: str) -> dict:
    return {k.replace(old, new): v for k, v in sd.items()}


def _dit_cases() -> dict[str, tuple[dict, list[str]]]:
    """name -> (the file's tensors, what the message must say)."""
    sd = tiny_dit_file_state()
    linear2 = "single_blocks.0.linear2.weight"
    return {
        "int8-weight": (_changed(sd, **{linear2.replace(".", "__"): sd[linear2].to(torch.int8)}),
                        [linear2, "as I8 (integer"]),
        "bool-norm": (_changed(sd, single_blocks__0__norm__key_norm__scale=torch.ones(128, dtype=torch.bool)),
                      ["single_blocks.0.norm.key_norm.scale", "as BOOL (boolean"]),
        "int32-bias": (_changed(sd, txt_in__bias=torch.zeros(256, dtype=torch.int32)), ["txt_in.bias", "as I32"]),
        "e8m0-scales": (_changed(sd, final_layer__linear__bias=torch.ones(64).to(torch.float8_e8m0fnu)),
                        ["final_layer.linear.bias", "F8_E8M0 (a micro-scaling"]),
        "extra-key": (_changed(sd, lora_unet_extra__alpha=torch.ones(1)),
                      ["lora_unet_extra.alpha", "has 1 tensor(s) that the Step1X-Edit DiT does not have"]),
        "missing-tensor": (_changed(sd, double_blocks__0__txt_attn__proj__bias=None),
                           ["lacks 1 tensor(s), e.g. double_blocks.0.txt_attn.proj.bias"]),
        "wrong-shape": (_changed(sd, double_blocks__0__img_mlp__2__weight=torch.zeros(256, 1000)),
                        ["double_blocks.0.img_mlp.2.weight is [256, 1000], expected [256, 1024]"]),
        "wrong-txt-in": (_changed(sd, txt_in__weight=torch.zeros(256, 200)),
                         ["txt_in.weight is [256, 200], expected [256, 256]"]),
        "block-gap": (_renamed(sd, "single_blocks.0.", "single_blocks.1."),
                      ["single blocks single_blocks.0 missing", "single_blocks.1"]),
        "latent-width": (_changed(sd, img_in__weight=torch.zeros(256, 60)),
                         ["in_channels must be 64", "img_in.weight is [256, 60]"]),
        "diffusers-missing-piece": (_changed(original_to_diffusers(sd, tiny_dit_params("v1.1")),
                                             transformer_blocks__0__attn__to_k__weight=None),
                                    ["transformer_blocks.0.attn.to_k.weight"]),
    }


DIT_CASES = sorted(_dit_cases())


def _write(tmp_path: Path, name: str, tensors: dict) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path))
    return path


def _api_message(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_dit(path, dtype=torch.float32)
    return str(info.value)


def _assert_one_clear_line(message: str, path: Path, fragments: list[str]) -> None:
    assert "\n" not in message, message
    assert message.startswith(f"{path.name}: ") and "Fix:" in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("case", DIT_CASES)
def test_dit_file_problems_are_named_before_building(tmp_path, case):
    tensors, fragments = _dit_cases()[case]
    path = _write(tmp_path, case, tensors)
    _assert_one_clear_line(_api_message(path), path, fragments)


def _raw_safetensors(path: Path, dtype: str, nbytes: int) -> Path:
    header = json.dumps({"img_in.weight": {"dtype": dtype, "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(nbytes))
    return path


@pytest.mark.parametrize("dtype", ["F6_E2M3", "Q4_K"])
def test_unknown_dtype_is_named_not_called_corrupt(tmp_path, dtype):
    path = _raw_safetensors(tmp_path / f"{dtype}.safetensors", dtype, 6)
    message = _api_message(path)
    assert f"stored as '{dtype}'" in message and "truncated or corrupt" not in message, message
    assert "\n" not in message and path.name in message, message


def test_forcing_v1_0_on_a_v1_1_file_is_explained(tiny_models):
    path = tiny_models / "diffusion_models" / V11_DIT
    with pytest.raises(CheckpointError) as info:
        load_dit(path, version="v1.0")
    assert "lacks connector.scale_factor: the file is a v1.1 DiT" in str(info.value), info.value
    assert "\n" not in str(info.value)


SAME_VERDICT = ["extra-key", "int8-weight", "missing-tensor", "wrong-shape"]


@pytest.mark.parametrize("case", SAME_VERDICT)
def test_the_same_dit_file_gets_the_same_verdict_everywhere(capsys, tmp_path, tiny_models, comfyui, model_files, case):
    """Python API, command line and ComfyUI's loader node: the same message (an extra key was refused by one
    and accepted by the other)."""
    tensors, _ = _dit_cases()[case]
    path = model_files("diffusion_models", f"{case}.safetensors")
    save_file(tensors, str(path))
    expected = _api_message(path)
    out = tmp_path / "out.png"
    assert main(["--models-dir", str(tiny_models), "--dit", str(path), "--image", str(CAT), "--instruction", "x",
                 "--output", str(out), *QUICK]) == 2
    assert one_error_line(capsys.readouterr().err) == f"step1x-edit: error: {expected}"
    assert not out.exists()
    error = run_error(comfyui, graph(dit=path.name, prefix="verdict", steps=1, size=32))
    assert expected in error, error


# ---- the VAE -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, fragments", [
    ({"decoder.conv_out.bias": torch.zeros(3, dtype=torch.int16)}, ["decoder.conv_out.bias", "as I16 (integer"]),
    ({"decoder.conv_out.weight": torch.zeros(3, 128, 1, 1)}, ["decoder.conv_out.weight is [3, 128, 1, 1], expected "
                                                              "[3, 128, 3, 3]"]),
    ({"encoder.extra.weight": torch.zeros(2)}, ["has 1 tensor(s) that the FLUX.1 VAE"]),
])
def test_vae_file_problems_are_named(tmp_path, tiny_models, change, fragments):
    tensors = {**load_file(str(tiny_models / "vae" / VAE)), **change}
    path = _write(tmp_path, "ae", tensors)
    with pytest.raises(VAEFileError) as info:
        load_vae(path)
    _assert_one_clear_line(str(info.value), path, fragments)


# ---- Qwen2.5-VL: config against weights ------------------------------------------------------------------


def _qwen_folder(source: Path, target: Path, config_change: dict | None = None,
                 weights_change: dict | None = None) -> Path:
    folder = Path(shutil.copytree(source, target))
    if config_change:
        config = json.loads((folder / "config.json").read_text())
        for key, value in config_change.items():
            if key == "vision_depth":
                config["vision_config"].update(depth=value, fullatt_block_indexes=[value - 1])
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    if weights_change:
        tensors = {**load_file(str(folder / "model.safetensors")), **weights_change}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


QWEN_CASES = {  # name -> (config change, weights change, what the message must say)
    "fewer-layers-in-config": ({"num_hidden_layers": 1, "max_window_layers": 1}, None,
                               ["the weights hold 2 decoder layers (model.layers.0-1), but num_hidden_layers in "
                                "config.json says 1: model.layers.1 would be silently left out"]),
    "more-layers-in-config": ({"num_hidden_layers": 3}, None,
                              ["decoder layers model.layers.2 missing", "num_hidden_layers in config.json says 3"]),
    "hidden-size": ({"hidden_size": 128}, None,
                    ["hidden_size must be 128 (config.json), but the weights have 64 (model.embed_tokens.weight"]),
    "vision-depth": ({"vision_depth": 1}, None, ["the weights hold 2 vision blocks", "vision_config.depth"]),
    "int8-weight": (None, {"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64, dtype=torch.int8)},
                    ["model.layers.0.mlp.up_proj.weight", "as I8 (integer"]),
}


@pytest.mark.parametrize("case", sorted(QWEN_CASES))
def test_qwen_folder_config_against_weights(tmp_path, tiny_models, case):
    config_change, weights_change, fragments = QWEN_CASES[case]
    folder = _qwen_folder(tiny_models / "text_encoders" / QWEN, tmp_path / case, config_change, weights_change)
    with pytest.raises(ValueError) as info:  # QwenFolderError
        QwenVLEmbedder.from_pretrained(folder, dtype=torch.float32)
    message = str(info.value)
    assert message.startswith(f"{case}: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_qwen_single_file_config_against_weights(tmp_path, tiny_models):
    source = tiny_models / "text_encoders" / QWEN_FP8_FILE
    with safe_open(str(source), "pt") as f:
        metadata = dict(f.metadata())
    config = json.loads(metadata["config"])
    metadata["config"] = json.dumps({**config, "num_hidden_layers": 1, "max_window_layers": 1})
    path = tmp_path / QWEN_FILE
    save_file(load_file(str(source)), str(path), metadata=metadata)
    with pytest.raises(ValueError) as info:  # QwenFileError
        QwenVLEmbedder.from_pretrained(path, dtype=torch.float32)
    assert "the weights hold 2 decoder layers" in str(info.value) and "would be silently left out" in str(info.value)


@pytest.mark.parametrize("case", ["fewer-layers-in-config", "hidden-size"])
def test_qwen_folder_verdict_in_the_cli_and_comfyui(capsys, tmp_path, tiny_models, comfyui, model_files, case):
    config_change, weights_change, fragments = QWEN_CASES[case]
    folder = _qwen_folder(tiny_models / "text_encoders" / QWEN, model_files("text_encoders", case), config_change,
                          weights_change)
    out = tmp_path / "out.png"
    assert main(["--models-dir", str(tiny_models), "--qwen", str(folder), "--image", str(CAT), "--instruction", "x",
                 "--output", str(out), *QUICK]) == 2
    line = one_error_line(capsys.readouterr().err)
    prompt = graph(prefix="qwen_config", steps=1, size=32)
    prompt["4"]["inputs"]["model_folder"] = folder.name
    error = run_error(comfyui, prompt)
    for fragment in fragments:
        assert fragment in line and fragment in error, (line, error)


# ---- the encoder against the connector -------------------------------------------------------------------


def test_encoder_width_names_the_known_sizes():
    from step1x_core.pipeline.fit import IncompatibleModelsError, check_encoder_width

    with pytest.raises(IncompatibleModelsError, match=r"2048 wide, as Qwen2.5-VL-3B-Instruct.*3584 wide, as "
                                                      + QWEN):
        check_encoder_width(2048, 3584)
    check_encoder_width(3584, 3584)


@pytest.fixture(scope="module")
def wide_connector_dit(tmp_path_factory):
    """A DiT whose connector reads 128-wide hidden states: the tiny Qwen (64) does not fit it, as a
    Qwen2.5-VL-3B (2048) does not fit the released 7B connector (3584)."""
    return write_tiny_dit(tmp_path_factory.mktemp("wide") / "wide-connector.safetensors", "v1.1", text_hidden=128)


def test_pipeline_names_an_encoder_that_does_not_fit_before_loading(tmp_path, tiny_models, wide_connector_dit):
    broken_vae = tmp_path / VAE
    broken_vae.write_bytes(b"")  # were the VAE loaded first, its error would come instead
    with pytest.raises(ValueError) as info:
        Step1XEditPipeline.from_files(wide_connector_dit, broken_vae, tiny_models / "text_encoders" / QWEN,
                                      device="cpu", dtype=torch.float32)
    message = str(info.value)
    assert "the text encoder Qwen2.5-VL-7B-Instruct does not fit the DiT wide-connector.safetensors" in message
    assert "64 wide" in message and "128 wide" in message, message


def test_cli_names_an_encoder_that_does_not_fit(capsys, tmp_path, tiny_models, wide_connector_dit):
    for qwen in (tiny_models / "text_encoders" / QWEN, tiny_models / "text_encoders" /
                 QWEN_FP8_FILE):
        out = tmp_path / "out.png"
        assert main(["--models-dir", str(tiny_models), "--dit", str(wide_connector_dit), "--qwen", str(qwen),
                     "--image", str(CAT), "--instruction", "x", "--output", str(out), *QUICK]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"the text encoder {qwen.name} does not fit" in line and "128 wide" in line, line


def test_comfyui_connector_names_an_encoder_that_does_not_fit(comfyui, model_files, wide_connector_dit):
    path = model_files("diffusion_models", "wide-connector.safetensors")
    shutil.copy(wide_connector_dit, path)
    result = comfyui.run(graph(dit=path.name, prefix="wide", steps=1, size=32))
    assert not result.success
    error = result.error()
    assert "'node_id': '7'" in error, error  # at the Connector, as soon as both are known
    assert "does not fit the Step1X-Edit DiT" in error and "64 wide" in error and "128 wide" in error, error
