"""Wrong, broken and unsafe model files: one clear message naming the file, what was found, what was expected.

Already covered elsewhere (not repeated here): a truncated DiT, a FLUX.1-dev DiT, a VAE as the DiT, pickled
DiTs (tests/dit/test_checkpoint.py); truncated, pickled, DiT, SD and diffusers files as the VAE (tests/vae/test_vae.py);
Qwen folders that are missing, a file, lack config.json / tokenizer files / weights / a shard, or hold Qwen2-VL
(tests/qwen/test_qwen_loader.py); the CLI naming a VAE given as the DiT (tests/commands/test_cli.py).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from step1x_core.dit.checkpoint import CheckpointError
from step1x_core.dit.loading import load_dit
from step1x_core.qwen.embedder import QwenVLEmbedder
from step1x_core.qwen.folder import QwenFolderError
from step1x_core.testing.tiny_dit import tiny_dit_params, tiny_dit_state_dict
from step1x_core.vae.loader import VAEFileError, load_vae
from tests.robustness.helpers import graph, run_error
from tests.release_names import QWEN_FOLDER as QWEN, V11_DIT, VAE

LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4b1f0a3c8e0c2d5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f\nsize 24893331456\n")
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Access denied</body></html>\n"

# name -> (file bytes, what the message must say it found)
CORRUPT_FILES = {
    "empty": (b"", "empty"),
    "garbage": (bytes(range(256)) * 8, "truncated or corrupt"),
    "lfs-pointer": (LFS_POINTER, "Git LFS pointer"),
    "html-page": (HTML_PAGE, "HTML page"),
    "huge-header": ((2**40).to_bytes(8, "little") + b"{}", "truncated or corrupt"),
}
LOADERS = {"dit": (load_dit, CheckpointError), "vae": (load_vae, VAEFileError)}


def _message(loader: str, path: Path) -> str:
    load, error = LOADERS[loader]
    with pytest.raises(error) as info:
        load(path)
    return str(info.value)


# ---- the standalone engine -----------------------------------------------------------------------------


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("case", sorted(CORRUPT_FILES))
def test_corrupt_safetensors_named_with_what_was_found(tmp_path, loader, case):
    data, found = CORRUPT_FILES[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    message = _message(loader, path)
    assert path.name in message and found in message, message
    assert "download" in message, message  # the fix


def _sdxl_checkpoint() -> dict[str, torch.Tensor]:
    """The key families of an SDXL single-file checkpoint (UNet, VAE, two CLIPs), tiny tensors."""
    return {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
            "model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
            "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
            "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77),
            "conditioner.embedders.1.model.ln_final.weight": torch.zeros(8)}


def _flux_dev(prefix: str = "") -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in tiny_dit_state_dict(tiny_dit_params("v1.1")).items() if not k.startswith("connector.")}
    sd["guidance_in.in_layer.weight"] = torch.zeros(256, 256)
    return {prefix + k: v for k, v in sd.items()}


FOREIGN_DITS = {
    "sd_xl_base_1.0.safetensors": (_sdxl_checkpoint, "Stable Diffusion"),
    "sdxl_unet_diffusers.safetensors": (lambda: {"conv_in.weight": torch.zeros(4, 4, 3, 3),
                                                 "down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3)},
                                        "diffusers UNet"),
    # FLUX.1-dev as ComfyUI saves it (model.diffusion_model.* prefix): still recognised.
    "flux1-dev-comfy.safetensors": (lambda: _flux_dev("model.diffusion_model."), "FLUX.1-dev"),
}


@pytest.mark.parametrize("name", sorted(FOREIGN_DITS))
def test_other_model_families_as_the_dit(tmp_path, name):
    make, found = FOREIGN_DITS[name]
    save_file(make(), str(tmp_path / name))
    message = _message("dit", tmp_path / name)
    assert name in message and "not a Step1X-Edit DiT" in message and found in message, message
    assert V11_DIT in message, message  # what was expected


def test_sdxl_checkpoint_as_the_vae(tmp_path):
    save_file(_sdxl_checkpoint(), str(tmp_path / "sd_xl_base_1.0.safetensors"))
    message = _message("vae", tmp_path / "sd_xl_base_1.0.safetensors")
    assert "sd_xl_base_1.0.safetensors" in message and "full diffusion checkpoint" in message, message
    assert VAE in message, message


def _copy_qwen(tiny_models, tmp_path, name="qwen") -> Path:
    return Path(shutil.copytree(tiny_models / "text_encoders" / QWEN, tmp_path / name))


def test_truncated_qwen_weights(tiny_models, tmp_path):
    folder = _copy_qwen(tiny_models, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(QwenFolderError) as info:
        QwenVLEmbedder.from_pretrained(folder, dtype=torch.float32)
    message = str(info.value)
    assert "model.safetensors" in message and "truncated or corrupt" in message and "download" in message, message


def test_qwen_pickle_weights_refused(tiny_models, tmp_path):
    """A folder whose weights are pytorch_model.bin (a pickle) is refused, never unpickled."""
    folder = _copy_qwen(tiny_models, tmp_path)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(QwenFolderError) as info:
        QwenVLEmbedder.from_pretrained(folder, dtype=torch.float32)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "pickle" in message and "model.safetensors" in message, message


def test_qwen_folder_with_both_formats_loads_the_safetensors(tiny_models, tmp_path):
    """Next to model.safetensors, a pickle is ignored (and never opened: it is not even a valid pickle)."""
    folder = _copy_qwen(tiny_models, tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle; must never be read")
    embedder = QwenVLEmbedder.from_pretrained(folder, dtype=torch.float32)
    assert embedder.hidden_size == 64


# ---- inside ComfyUI ------------------------------------------------------------------------------------


def test_comfyui_dit_loader_names_broken_and_foreign_files(comfyui, model_files, tiny_models):
    truncated = model_files("diffusion_models", "truncated.safetensors")
    full = (tiny_models / "diffusion_models" / V11_DIT).read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    lfs = model_files("diffusion_models", "lfs.safetensors")
    lfs.write_bytes(LFS_POINTER)
    flux = model_files("diffusion_models", "flux1-dev.safetensors")
    save_file(_flux_dev(), str(flux))
    sdxl = model_files("diffusion_models", "sd_xl_base_1.0.safetensors")
    save_file(_sdxl_checkpoint(), str(sdxl))
    vae = model_files("diffusion_models", VAE)
    shutil.copy(tiny_models / "vae" / VAE, vae)
    pickle = model_files("diffusion_models", "step1x-edit.ckpt")  # ComfyUI lists .ckpt files too
    pickle.write_bytes(b"never unpickled")
    expected = {truncated: "truncated or corrupt", lfs: "Git LFS pointer", flux: "FLUX.1-dev",
                sdxl: "Stable Diffusion", vae: "a VAE", pickle: "pickle"}
    for path, found in expected.items():
        error = run_error(comfyui, graph(dit=path.name, prefix="bad_dit"))
        assert path.name in error and found in error, error


def test_comfyui_qwen_loader_names_broken_folders(comfyui, model_files, tiny_models):
    source = tiny_models / "text_encoders" / QWEN
    no_tokenizer = Path(shutil.copytree(source, model_files("text_encoders", "no-tokenizer")))
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (no_tokenizer / name).unlink()
    qwen2 = Path(shutil.copytree(source, model_files("text_encoders", "Qwen2-VL-7B-Instruct")))
    config = json.loads((qwen2 / "config.json").read_text())
    (qwen2 / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl"}))
    truncated = Path(shutil.copytree(source, model_files("text_encoders", "truncated")))
    (truncated / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:4096])
    expected = {no_tokenizer: "lacks tokenizer file", qwen2: "found qwen2_vl (Qwen2-VL)",
                truncated: "truncated or corrupt"}
    for folder, found in expected.items():
        prompt = graph(prefix="bad_qwen")
        prompt["4"]["inputs"]["model_folder"] = folder.name
        error = run_error(comfyui, prompt)
        assert folder.name in error and found in error and QWEN in error, error


def test_comfyui_qwen_folder_without_config_is_unlisted_and_named_when_forced(comfyui, model_files, tiny_models):
    folder = Path(shutil.copytree(tiny_models / "text_encoders" / QWEN, model_files("text_encoders", "no-config")))
    (folder / "config.json").unlink()
    loader = comfyui.node_class("Step1XEditQwenVLLoader")
    listed = sys.modules[loader.__module__].qwen_choices()
    assert QWEN in listed and folder.name not in listed  # only folders holding config.json are offered
    with pytest.raises(ValueError, match="no config.json") as info:  # QwenFolderError of the pack's import
        loader.execute(folder.name, "auto", "default")
    assert folder.name in str(info.value) and "tokenizer.json" in str(info.value)  # what it found


def _refused(comfyui, prompt: dict) -> str:
    """ComfyUI >= 0.3.6x validates V3 combo values against their list ("Value not in list"); older ones
    (0.3.64) pass any string on to the node, which must then refuse it itself."""
    try:
        return run_error(comfyui, prompt)
    except AssertionError as refused:
        assert "not in list" in str(refused), refused
        return str(refused)


def test_comfyui_refuses_names_escaping_the_models_folder(comfyui, tmp_path):
    """`../` in a model name, through a graph and through direct `execute` calls (scripts, other nodes):
    both loaders refuse a name that leaves their models folder, saying so."""
    outside_qwen = Path(shutil.copytree(comfyui.models / "text_encoders" / QWEN, tmp_path / "outside-qwen"))
    escaping_qwen = "../" * 12 + str(outside_qwen).lstrip("/")
    escaping_dit = "../" * 12 + str(comfyui.models / "vae" / VAE).lstrip("/")
    for node, field, name, fragment in (("3", "dit_name", escaping_dit, "outside models/diffusion_models/"),
                                        ("4", "model_folder", escaping_qwen, "outside models/text_encoders/")):
        prompt = graph(prefix="escape")
        prompt[node]["inputs"][field] = name
        error = _refused(comfyui, prompt)
        assert "not in list" in error or fragment in error, error

    dit_loader = comfyui.node_class("Step1XEditDiTLoader")
    for name in ("../vae/ae.safetensors", escaping_dit, "/etc/passwd"):
        with pytest.raises(ValueError, match="outside models/diffusion_models/"):
            dit_loader.execute(name, "default", "auto")
    qwen_loader = comfyui.node_class("Step1XEditQwenVLLoader")
    for name in (escaping_qwen, str(outside_qwen), "../text_encoders/" + QWEN, ".."):
        with pytest.raises(ValueError, match="outside models/text_encoders/") as info:
            qwen_loader.execute(name, "auto", "default")
        assert repr(name) in str(info.value)
    # A name that stays inside the folder after normalisation is fine.
    assert qwen_loader.execute(f"{QWEN}/../{QWEN}", "auto", "default").result[0] is not None
