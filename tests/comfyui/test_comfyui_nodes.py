"""The node pack inside real ComfyUI, on tiny models under the real release file names.

Skipped (with one line in the run's header and summary) when no ComfyUI checkout is found.
"""

from __future__ import annotations

import sys

import pytest
import torch

from step1x_core.release_files import find_in_models_dir
from step1x_core.pipeline import EditSettings, Step1XEditPipeline
from step1x_core.testing.tiny_dit import tiny_dit_params
from step1x_core.vae.params import SCALE_FACTOR, SHIFT_FACTOR
from step1x_core.commands.bench_measure import relative_error
from tests.comfyui.graphs import (INSTRUCTION, LATENT_TOLERANCE, QWEN_FOLDER, QWEN_FP8_FILE, SIZE, TINY_LORA, V11_DIT,
                                  edit_graph, run_ok, saved_latent)
from tests.golden import REPO_ROOT


NODE_IDS = ["Step1XEditDiTLoader", "Step1XEditQwenVLLoader", "Step1XEditQwenVLEncode", "Step1XEditConnector",
            "Step1XEditImageScale", "Step1XEditSampler", "Step1XEditRestoreSize", "Step1XEditScheduler",
            "Step1XEditNormalizedCFG", "Step1XEditMaskedPaste"]


def test_pack_registers_every_node_with_tooltips(comfyui):
    for node_id in NODE_IDS:
        cls = comfyui.node_class(node_id)
        schema = cls.GET_SCHEMA() if hasattr(cls, "GET_SCHEMA") else cls.define_schema()
        assert schema.description, node_id
        for item in schema.inputs:
            assert item.tooltip, f"{node_id}.{item.id} has no tooltip"
        for item in schema.outputs:
            assert item.tooltip, f"{node_id} output {item.id} has no tooltip"


def test_object_info_lists_the_nodes(comfyui):
    """What /object_info serves for V3 nodes (server.node_info calls GET_NODE_INFO_V1)."""
    for node_id in NODE_IDS:
        info = comfyui.node_class(node_id).GET_NODE_INFO_V1()
        assert info["category"] == "Step1X-Edit" and info["description"], node_id
        for name, spec in info["input"]["required"].items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip in object_info"
        assert all(info["output_tooltips"]), node_id


def pipeline_latent(models, qwen_path, seed: int, cfg: float = 6.0) -> torch.Tensor:
    """The core pipeline's latent for edit_graph's edit, in float32."""
    from PIL import Image

    from step1x_core.images.sizing import pil_to_tensor, resize_to_level

    pipe = Step1XEditPipeline.from_files(find_in_models_dir(models, "dit"), find_in_models_dir(models, "vae"),
                                         qwen_path, device="cpu", dtype=torch.float32)
    settings = EditSettings(steps=3, cfg_scale=cfg, seed=seed, size_level=SIZE)
    pixels = pil_to_tensor(resize_to_level(Image.open(REPO_ROOT / "tests" / "data" / "cat.png").convert("RGB"), SIZE))
    ctx = pipe.encode_prompt(INSTRUCTION, pixels, "", with_uncond=cfg != 1.0)
    return pipe.sample(ctx, pipe.encode_image(pixels), settings)


def test_full_graph_matches_the_core_pipeline(comfyui):
    result = run_ok(comfyui, edit_graph(seed=7))
    graph_latent = saved_latent(comfyui, result)
    expected = pipeline_latent(comfyui.models, find_in_models_dir(comfyui.models, "text_encoder"), seed=7)
    ours = (graph_latent - SHIFT_FACTOR) * SCALE_FACTOR  # ComfyUI's latent space is unscaled
    assert ours.shape == expected.shape
    error = relative_error(ours, expected)
    assert error <= LATENT_TOLERANCE, f"graph latent differs from the pipeline's by {error:.2e}"
    saved = result.outputs["12"]["images"][0]
    assert (comfyui.workdir / "output" / saved["subfolder"] / saved["filename"]).is_file()


def test_comfyui_single_file_qwen_runs_the_edit(comfyui):
    """ComfyUI's fp8-scaled Qwen2.5-VL file is offered next to the folder and gives the core pipeline's result
    for that file; fp8 storage makes it differ from the folder's bf16 weights."""
    loader = comfyui.node_class("Step1XEditQwenVLLoader")
    choices = sys.modules[loader.__module__].qwen_choices()
    assert choices.index(QWEN_FOLDER) < choices.index(QWEN_FP8_FILE)  # folders first, then files
    single_file = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=7, qwen=QWEN_FP8_FILE, prefix="fp8qwen")))
    expected = pipeline_latent(comfyui.models, comfyui.models / "text_encoders" / QWEN_FP8_FILE, seed=7)
    error = relative_error((single_file - SHIFT_FACTOR) * SCALE_FACTOR, expected)
    assert error <= LATENT_TOLERANCE, f"graph latent differs from the pipeline's by {error:.2e}"
    folder = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=7, prefix="folderqwen")))
    assert relative_error(single_file, folder) > 10 * LATENT_TOLERANCE


def test_normalised_cfg_engages_in_the_graph(comfyui):
    normalised = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=7, prefix="norm")))
    plain = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=7, threshold=1.0, prefix="plain_cfg")))
    assert relative_error(normalised, plain) > 1e-3


def test_dit_file_variants(comfyui):
    """diffusers layout gives the same edit; fp8 files and the fp8 weight option run with fp8 weights."""
    from step1x_core.testing.factory import TEXT_GAIN
    from step1x_core.testing.tiny_dit import write_tiny_dit

    folder = comfyui.models / "diffusion_models"
    common = dict(seed=1, text_hidden=64, text_gain=TEXT_GAIN)  # the v1.1 file of make_tiny
    write_tiny_dit(folder / "tiny-diffusers.safetensors", "v1.1", layout="diffusers", **common)
    write_tiny_dit(folder / "tiny-fp8.safetensors", "v1.1", dtype=torch.float8_e4m3fn, **common)
    reference = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=3, prefix="orig")))
    converted = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=3, dit="tiny-diffusers.safetensors",
                                                                 prefix="diffusers")))
    torch.testing.assert_close(converted, reference, rtol=0, atol=0)

    # "default" is ComfyUI's own choice (on a CPU: upcast); fp8_e4m3fn keeps fp8 weights on any device.
    loader = comfyui.node_class("Step1XEditDiTLoader")
    for name in ("tiny-fp8.safetensors", V11_DIT):
        patcher = loader.execute(name, "fp8_e4m3fn", "auto").result[0]
        assert patcher.model.diffusion_model.img_in.weight.dtype == torch.float8_e4m3fn, name
    for name, weight_dtype in (("tiny-fp8.safetensors", "default"), (V11_DIT, "fp8_e4m3fn")):
        graph = edit_graph(seed=3, dit=name, prefix="fp8")
        graph["3"]["inputs"]["weight_dtype"] = weight_dtype
        fp8 = saved_latent(comfyui, run_ok(comfyui, graph))
        assert torch.isfinite(fp8).all() and relative_error(fp8, reference) < 0.2, name  # fp8 rounding only


def test_cfg_one_skips_the_negative_branch(comfyui):
    """At cfg 1 ComfyUI runs no negative branch; the edit must then equal the conditional flow."""
    module = sys.modules[comfyui.node_class("Step1XEditNormalizedCFG").__module__]
    cond = torch.randn(1, 16, 4, 4) * 3
    args = {"conds": [[{}], None], "conds_out": [cond, torch.zeros_like(cond)], "sigma": torch.tensor([0.99])}
    assert module.normalized_cfg(0.93)(args)[0] is cond
    graph_latent = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=9, cfg=1.0, prefix="cfg1")))
    expected = pipeline_latent(comfyui.models, find_in_models_dir(comfyui.models, "text_encoder"), seed=9, cfg=1.0)
    error = relative_error((graph_latent - SHIFT_FACTOR) * SCALE_FACTOR, expected)
    assert error <= LATENT_TOLERANCE, f"cfg-1 graph latent differs from the pipeline's conditional flow by {error:.2e}"
    guided = pipeline_latent(comfyui.models, find_in_models_dir(comfyui.models, "text_encoder"), seed=9)
    assert relative_error(expected, guided) > 10 * LATENT_TOLERANCE  # cfg 1 really drops the guidance


def test_second_run_reuses_everything_and_seed_reruns_only_the_sampler(comfyui):
    run_ok(comfyui, edit_graph(seed=11))
    again = run_ok(comfyui, edit_graph(seed=11))
    assert {"3", "4", "5", "6", "7", "8", "9"} <= again.cached_nodes()
    assert not again.executed_nodes() & {"3", "4", "5", "6", "7", "8", "9"}
    reseeded = run_ok(comfyui, edit_graph(seed=12))
    assert {"3", "4", "5", "6", "7", "8"} <= reseeded.cached_nodes()
    assert {"9", "10", "11", "12", "13"} <= reseeded.executed_nodes()


def test_progress_reaches_comfyui_for_every_step(comfyui):
    result = run_ok(comfyui, edit_graph(seed=21, steps=4))
    assert result.progress("9") == [1, 2, 3, 4]


def test_interrupt_then_run_again(comfyui):
    import comfy.model_management

    def interrupt_after_first_step(value, total):
        if value == 1:
            comfy.model_management.interrupt_current_processing(True)

    comfyui.step_hook = interrupt_after_first_step
    try:
        result = comfyui.run(edit_graph(seed=31, steps=4))
    finally:
        comfyui.step_hook = None
    assert not result.success
    assert any(event == "execution_interrupted" for event, _ in result.messages)
    assert "10" not in result.executed_nodes()  # nothing after the sampler ran
    run_ok(comfyui, edit_graph(seed=31, steps=4))


def test_lora_changes_the_output_and_unpatching_restores_it(comfyui):
    plain = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=41, prefix="plain")))
    patched = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=41, lora=TINY_LORA,
                                                               prefix="lora")))
    assert relative_error(patched, plain) > 1e-3
    restored = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=41, prefix="restored", steps=3, cfg=6.0)))
    torch.testing.assert_close(restored, plain, rtol=0, atol=0)


def test_lora_keys_map_onto_the_model(comfyui):
    import comfy.lora

    from step1x_core.testing.tiny_lora import lora_target_modules

    patcher = comfyui.node_class("Step1XEditDiTLoader").execute(V11_DIT, "default", "auto").result[0]
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    for name in lora_target_modules(tiny_dit_params("v1.1")):
        assert key_map["lora_unet_" + name.replace(".", "_")] == f"diffusion_model.{name}.weight"


def test_partial_loading_gives_the_same_output(comfyui):
    loader = comfyui.node_class("Step1XEditDiTLoader")
    full = loader.execute(V11_DIT, "default", "auto").result[0]
    partial = loader.execute(V11_DIT, "default", "auto").result[0]
    full.load(torch.device("cpu"), lowvram_model_memory=0, full_load=True)
    budget = full.model_size() // 3
    partial.load(torch.device("cpu"), lowvram_model_memory=budget, full_load=False)
    assert partial.model.model_lowvram and partial.lowvram_patch_counter() >= 0
    assert any(getattr(m, "comfy_cast_weights", False) for m in partial.model.diffusion_model.modules())

    gen = torch.Generator().manual_seed(0)
    params = tiny_dit_params("v1.1")
    x = torch.randn(2, 16, 8, 8, generator=gen)
    inputs = dict(timestep=torch.full((2,), 0.7),
                  context=torch.randn(2, 20, params.connector.in_channels, generator=gen),
                  txt_mask=torch.ones(2, 20, dtype=torch.long), ref_latents=[torch.randn(1, 16, 8, 8, generator=gen)])
    with torch.no_grad():
        expected = full.model.diffusion_model(x, **inputs)
        actual = partial.model.diffusion_model(x, **inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma, normalize", [(0.95, True), (0.5, False)])
def test_normalised_cfg_matches_the_core_rule(comfyui, sigma, normalize):
    """ComfyUI's plain CFG after our pre-CFG function, on denoised latents, equals the core rule on packed
    velocity tokens."""
    from step1x_core.sampling.guidance import cfg_combine
    from step1x_core.sampling.latents import pack, unpack

    module = sys.modules[comfyui.node_class("Step1XEditNormalizedCFG").__module__]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 6, 8, generator=gen)
    cond_v, uncond_v = (torch.randn(2, 16, 6, 8, generator=gen) * 3 for _ in range(2))
    sigmas = torch.full((2,), sigma)
    cond, uncond = x - sigma * cond_v, x - sigma * uncond_v  # what the model hands over: denoised
    args = {"conds": [[{}], [{}]], "conds_out": [cond, uncond], "sigma": sigmas}
    new_cond, new_uncond = module.normalized_cfg(0.93)(args)
    denoised = new_uncond + (new_cond - new_uncond) * 6.0  # ComfyUI's cfg_function without a CFG patch
    expected = x - sigma * unpack(cfg_combine(pack(cond_v), pack(uncond_v), 6.0, normalize), 6, 8)
    torch.testing.assert_close(denoised, expected, rtol=1e-5, atol=1e-5)


def test_fp8_fast_multiplies_in_fp8_where_comfyui_says_the_device_can(comfyui, monkeypatch):
    """fp8_e4m3fn_fast, as in Load Diffusion Model: fp8 matmul where comfy.model_management says the device
    computes in fp8, plain fp8 storage elsewhere. PyTorch's CPU build has an fp8 _scaled_mm kernel, so
    ComfyUI's own switch (--supports-fp8-compute) runs it here."""
    import comfy.model_management

    def fp8_layers(weight_dtype):
        model = loader.execute(V11_DIT, weight_dtype, "auto").result[0].model.diffusion_model
        return [m for m in model.modules() if type(m).__name__ == "Linear" and type(m).__qualname__.startswith("Fp8")]

    loader = comfyui.node_class("Step1XEditDiTLoader")
    assert not fp8_layers("fp8_e4m3fn_fast")  # the CPU does not claim fp8 compute by default
    # cfg 1: with cfg 6 the tiny model multiplies any rounding of its small cond-uncond difference by 6
    stored = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=7, cfg=1.0, weight_dtype="fp8_e4m3fn",
                                                              prefix="fp8")))

    monkeypatch.setattr(comfy.model_management, "SUPPORT_FP8_OPS", True)
    assert fp8_layers("fp8_e4m3fn_fast") and not fp8_layers("fp8_e4m3fn")
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, _mm=torch._scaled_mm, **k: calls.append(1) or _mm(*a, **k))
    fast = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=7, cfg=1.0, weight_dtype="fp8_e4m3fn_fast",
                                                            prefix="fp8mm")))
    assert calls, "no fp8 matmul ran"
    error = relative_error(fast, stored)  # measured 7.9e-2; fp8 storage itself is 6.8e-2 from bf16
    assert 0 < error < 0.15, f"fp8 matmul moved the latent by {error:.2e} from fp8 storage"


COMFY_DIT_LOADING = """
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests import cpu_torchvision
cpu_torchvision.apply()
from step1x_core.dit.params import ConnectorParams, DiTParams
from step1x_core.testing.tiny_dit import tiny_dit_state_dict
from tests.comfyui_harness import ComfyUI
from tests.robustness.helpers import peak_mb, reset_peak, rss_mb

workdir, loader = Path(sys.argv[2]), sys.argv[3]
comfy = ComfyUI(Path(sys.argv[1]), workdir)
# wide enough that the weights dominate; bf16 like the release files
params = DiTParams(hidden_size=1024, num_heads=8, depth=3, depth_single_blocks=3, context_in_dim=256,
                   version="v1.1", connector=ConnectorParams(in_channels=64, hidden_size=256, num_heads=2))
path = comfy.models / "diffusion_models" / "wide.safetensors"
save_file({k: v.to(torch.bfloat16) for k, v in tiny_dit_state_dict(params).items()}, str(path))
before = rss_mb()
reset_peak()
if loader == "step1x":
    patcher = comfy.node_class("Step1XEditDiTLoader").execute("wide.safetensors", "bf16", "auto").result[0]
else:
    patcher = comfy.node_class("UNETLoader")().load_unet("wide.safetensors", "default")[0]
touched = sum(float(p.float().sum()) for p in patcher.model.parameters())  # read every weight once
print(before, peak_mb(), path.stat().st_size / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc")
def test_dit_loader_holds_no_more_than_comfyuis_own_loader(comfyui, tmp_path):
    """Load Step1X-Edit DiT goes through ComfyUI's loader and adds no copy of the weights: peak RSS while
    loading (in a fresh process with ComfyUI booted) grows no more than with native Load Diffusion Model on the
    same file, and by at most about two files (the mapped file and the model ComfyUI copies it into; under
    dynamic VRAM, ComfyUI 0.38 assigns the mapped tensors instead)."""
    import subprocess

    growth = {}
    for loader in ("step1x", "native"):
        out = subprocess.run([sys.executable, "-c", COMFY_DIT_LOADING, str(comfyui.root), str(tmp_path / loader),
                              loader], check=True, capture_output=True, text=True, cwd=REPO_ROOT)
        before, peak, size = map(float, out.stdout.split()[-3:])
        growth[loader] = peak - before
    assert size > 100
    assert growth["step1x"] <= growth["native"] * 1.05 + 32, growth
    assert growth["step1x"] <= 2.2 * size, f"loading {size:.0f} MiB raised peak RSS by {growth} MiB"
