"""Checkpoint formats: configuration inference, versions, diffusers layout, fp8 storage, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from step1x_core.dit.checkpoint import CheckpointError, infer_params
from step1x_core.dit.loading import load_dit, read_dit_checkpoint
from step1x_core.dit.diffusers_keys import diffusers_to_original
from step1x_core.testing.tiny_dit import original_to_diffusers
from step1x_core.dit.params import STEP1X_EDIT_PARAMS
from step1x_core.dit.model import Step1XEditDiT
from step1x_core.sampling.latents import edit_ids
from step1x_core.testing.tiny_dit import tiny_dit_params, tiny_dit_state_dict, write_tiny_dit
from tests.release_names import VAE


def _meta_state_dict(params):
    with torch.device("meta"):
        return Step1XEditDiT(params).state_dict()


def test_full_size_layout_matches_the_release():
    sd = _meta_state_dict(STEP1X_EDIT_PARAMS)
    assert len(sd) == 817
    assert sum(t.numel() for t in sd.values()) == 12_427_800_385
    assert infer_params(sd) == STEP1X_EDIT_PARAMS


def test_full_size_v1_1_has_no_scale_factor():
    params = STEP1X_EDIT_PARAMS.with_version("v1.1")
    sd = _meta_state_dict(params)
    assert len(sd) == 816 and "connector.scale_factor" not in sd
    assert infer_params(sd) == params


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_tiny_params_inferred(version):
    params = tiny_dit_params(version)
    assert infer_params(tiny_dit_state_dict(params)) == params


def _run(model, version, seed=0):
    """One DiT call on fixed random inputs (target + reference tokens, cond/uncond batch)."""
    gen = torch.Generator().manual_seed(seed)
    p = model.params
    img = torch.randn(2, 32, p.in_channels, generator=gen)
    llm = torch.randn(2, 20, p.connector.in_channels, generator=gen)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 12:] = 0
    img_ids, txt_ids = edit_ids(8, 8, 2, version, 20)
    t = torch.full((2,), 0.7)
    with torch.no_grad():
        return model(img, img_ids, txt_ids, t, llm, t, mask)


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_diffusers_layout_round_trip(tmp_path, version):
    params = tiny_dit_params(version)
    sd = tiny_dit_state_dict(params)
    diffusers_sd = original_to_diffusers(sd, params)
    assert any(k.startswith("transformer_blocks.0.attn.to_q") for k in diffusers_sd)
    assert not any(k.startswith("double_blocks") for k in diffusers_sd)
    back = diffusers_to_original(diffusers_sd)
    assert back.keys() == sd.keys()
    for key in sd:
        torch.testing.assert_close(back[key], sd[key], rtol=0, atol=0, msg=key)
    # The swapped final-norm halves are really swapped in the diffusers file.
    first_half = diffusers_sd["norm_out.linear.weight"][: params.hidden_size]
    torch.testing.assert_close(first_half, sd["final_layer.adaLN_modulation.1.weight"][params.hidden_size:])

    original = load_dit(write_tiny_dit(tmp_path / "orig.safetensors", version, dtype=torch.float32))
    converted = load_dit(write_tiny_dit(tmp_path / "diff.safetensors", version, dtype=torch.float32,
                                        layout="diffusers"))
    assert read_dit_checkpoint(tmp_path / "diff.safetensors").layout == "diffusers"
    torch.testing.assert_close(_run(converted, version), _run(original, version), rtol=0, atol=0)


def test_comfyui_prefix_is_stripped(tmp_path):
    sd = tiny_dit_state_dict(tiny_dit_params("v1.1"))
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(tmp_path / "wrapped.safetensors"))
    assert load_dit(tmp_path / "wrapped.safetensors").params.version == "v1.1"


def test_v1_1_file_detected_and_runs(tmp_path):
    model = load_dit(write_tiny_dit(tmp_path / "v11.safetensors", "v1.1", dtype=torch.float32))
    assert model.params.version == "v1.1"
    assert not hasattr(model.connector, "scale_factor")
    assert torch.isfinite(_run(model, "v1.1")).all()


def test_version_override_drops_scale_factor(tmp_path):
    model = load_dit(write_tiny_dit(tmp_path / "v10.safetensors", "v1.0"), version="v1.1", dtype=torch.float32)
    assert model.params.version == "v1.1" and not hasattr(model.connector, "scale_factor")


def test_fp8_file_loads_and_runs_with_per_layer_cast(tmp_path):
    path = write_tiny_dit(tmp_path / "fp8.safetensors", "v1.0", dtype=torch.float8_e4m3fn)
    model = load_dit(path)
    assert model.img_in.weight.dtype == torch.float8_e4m3fn
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    out = _run(model, "v1.0")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # Same numbers as a float32 model holding the upcast fp8 values: the cast is the only change.
    upcast = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    save_file(upcast, str(tmp_path / "upcast.safetensors"))
    reference = _run(load_dit(tmp_path / "upcast.safetensors"), "v1.0")
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_fp8_weight_dtype_from_bf16_file(tmp_path):
    model = load_dit(write_tiny_dit(tmp_path / "bf16.safetensors", "v1.1"), dtype=torch.float8_e4m3fn)
    assert model.txt_in.weight.dtype == torch.float8_e4m3fn
    assert model.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.bfloat16
    assert torch.isfinite(_run(model, "v1.1")).all()


# --- errors ----------------------------------------------------------------------------------------
def _expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_dit(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.safetensors", "not found")


def test_folder_instead_of_file(tmp_path):
    _expect_error(tmp_path, "folder")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickles_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not loaded")
    _expect_error(path, "pickle", "safetensors")


def test_truncated_file(tmp_path):
    data = write_tiny_dit(tmp_path / "full.safetensors").read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    _expect_error(path, "truncated.safetensors", "truncated or corrupt")


def test_flux_dev_checkpoint_refused(tmp_path):
    sd = tiny_dit_state_dict(tiny_dit_params("v1.1"))
    flux = {k: v for k, v in sd.items() if not k.startswith("connector.")}
    flux["guidance_in.in_layer.weight"] = torch.zeros(256, 256)
    save_file(flux, str(tmp_path / "flux1-dev.safetensors"))
    _expect_error(tmp_path / "flux1-dev.safetensors", "FLUX.1-dev", "not a Step1X-Edit DiT", "connector")


def test_vae_refused(tmp_path):
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(8, 16, 3, 3)},
              str(tmp_path / VAE))
    _expect_error(tmp_path / VAE, "a VAE", "diffusion_models")


def test_unrelated_tensors_refused(tmp_path):
    save_file({"foo.weight": torch.zeros(2, 2)}, str(tmp_path / "foo.safetensors"))
    _expect_error(tmp_path / "foo.safetensors", "not a Step1X-Edit DiT", "foo.weight")


def test_incomplete_checkpoint(tmp_path):
    sd = tiny_dit_state_dict(tiny_dit_params("v1.0"))
    del sd["vector_in.in_layer.weight"]
    save_file(sd, str(tmp_path / "partial.safetensors"))
    _expect_error(tmp_path / "partial.safetensors", "incomplete", "vector_in.in_layer.weight")


WIDE_WRITER = textwrap.dedent("""
    import sys
    from safetensors.torch import save_file
    from step1x_core.dit.params import ConnectorParams, DiTParams
    from step1x_core.testing.tiny_dit import tiny_dit_state_dict
    # wide enough that the weights dominate the interpreter's own memory
    params = DiTParams(hidden_size=1024, num_heads=8, depth=3, depth_single_blocks=3, context_in_dim=256,
                       version="v1.1", connector=ConnectorParams(in_channels=64, hidden_size=256, num_heads=2))
    save_file(tiny_dit_state_dict(params), sys.argv[1])
""")
PEAK_LOADER = textwrap.dedent("""
    import os, sys
    from step1x_core.dit.loading import load_dit

    def peak_rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    before = peak_rss()
    model = load_dit(sys.argv[1])
    touched = sum(float(p.sum()) for p in model.parameters())  # read every weight once
    print(before, peak_rss(), os.path.getsize(sys.argv[1]))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
@pytest.mark.slow
def test_loading_memory_maps_the_file(tmp_path):
    """Peak RSS while loading and reading every weight stays near one copy of the file."""
    path = tmp_path / "wide.safetensors"
    subprocess.run([sys.executable, "-c", WIDE_WRITER, str(path)], check=True)
    out = subprocess.run([sys.executable, "-c", PEAK_LOADER, str(path)], check=True, capture_output=True, text=True)
    before, peak, size = map(int, out.stdout.split())
    assert size > 100 * 2**20
    growth = peak - before
    assert growth <= 1.1 * size, f"loading {size / 2**20:.0f} MiB raised peak RSS by {growth / 2**20:.0f} MiB"
