"""Step1X-Edit v1.2 and text-to-image in real ComfyUI, on make-tiny's v1.2 release (its transformer/ and
text_encoder/ folders, placed as the downloader places them).

The graph's latent is checked against the engine's loop with the diffusers flow given the
graph's own noise and reference latent: ComfyUI draws its noise and encodes the reference its own way, but
everything the model does with them (v1.2 prompt format, text ids, quote mapping, reference ids, CFG at every
step, schedule) must be the reference's.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from step1x_core.dit.loading import load_dit
from step1x_core.images.sizing import resize_to_level
from step1x_core.pipeline.text_to_image import encode_prompts
from step1x_core.qwen.embedder import QwenVLEmbedder
from step1x_core.qwen.embedder_v12 import QwenV12Embedder
from step1x_core.qwen.prompt_v12 import T2I_NEGATIVE_PROMPT
from step1x_core.sampling.diffusers import REFERENCE_THRESHOLD, DiffusersFlow
from step1x_core.sampling.latents import pack, target_ids, unpack
from step1x_core.sampling.loop import DiTText, Guidance, denoise
from step1x_core.vae.params import SCALE_FACTOR, SHIFT_FACTOR
from step1x_core.commands.bench_measure import relative_error
from tests.golden import REPO_ROOT
from tests.comfyui.graphs import LATENT_TOLERANCE, SIZE, edit_graph, run_ok, saved_latent
from tests.release_names import QWEN_FOLDER, V11_DIT, V12_DIT, V12_QWEN, VAE

INSTRUCTION = 'replace the text "OPEN" with "SHUT"'
STEPS = 3


def v12_graph(seed: int = 5, prefix: str = "v12", prompt_format: str = "v1.2", dit: str = V12_DIT) -> dict:
    g = edit_graph(seed=seed, steps=STEPS, threshold=0.0, dit=dit, qwen=V12_QWEN, instruction=INSTRUCTION,
                   prefix=prefix)
    g["2"]["inputs"]["resample"] = "lanczos"  # what v1.2's MLLM sees
    g["6"]["inputs"]["prompt_format"] = prompt_format
    g["14"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": prefix + "_ref"}}
    return g


def _saved(comfyui, result, node: str):
    from safetensors.torch import load_file

    entry = result.outputs[node]["latents"][0]
    return load_file(str(comfyui.workdir / "output" / entry["subfolder"] / entry["filename"]))["latent_tensor"]


def _engine(models):
    dit = load_dit(models / "diffusion_models" / V12_DIT, dtype=torch.float32)
    embedder = QwenV12Embedder.from_embedder(
        QwenVLEmbedder.from_pretrained(models / "text_encoders" / V12_QWEN, dtype=torch.float32))
    return dit, embedder


def _inputs(dit, embedder, text: str, image: Image.Image) -> DiTText:
    e = embedder(text, image)
    ctx = dit.precompute(e.hidden, torch.ones(e.hidden.shape[:2], dtype=torch.long), e.text_embeds, e.text_mask)
    return DiTText(ctx, e.txt_ids)


@torch.inference_mode()
def _engine_latent(dit, cond, uncond, noise, reference=None) -> torch.Tensor:
    """The engine's loop (diffusers flow) from the graph's noise (and reference), as ComfyUI's latent (unscaled)."""
    lat_h, lat_w = noise.shape[-2:]
    ref_tokens = None if reference is None else pack((reference - SHIFT_FACTOR) * SCALE_FACTOR)
    img_ids = target_ids(lat_h, lat_w, 1, None if reference is None else dit.params.version)
    flow = DiffusersFlow.for_image(STEPS, (lat_h // 2) * (lat_w // 2))
    tokens = denoise(dit, flow, pack(noise), img_ids, cond, uncond, Guidance(6.0, REFERENCE_THRESHOLD),
                     reference=ref_tokens)
    return unpack(tokens, lat_h, lat_w) / SCALE_FACTOR + SHIFT_FACTOR


def test_v12_edit_graph_gives_the_port_loop(comfyui):
    import comfy.sample

    result = run_ok(comfyui, v12_graph(seed=5))
    graph_latent, reference = saved_latent(comfyui, result), _saved(comfyui, result, "14")
    dit, embedder = _engine(comfyui.models)
    image = resize_to_level(Image.open(REPO_ROOT / "tests" / "data" / "cat.png").convert("RGB"), SIZE, "lanczos")
    cond, uncond = _inputs(dit, embedder, INSTRUCTION, image), _inputs(dit, embedder, "", image)
    noise = comfy.sample.prepare_noise(reference, 5)
    expected = _engine_latent(dit, cond, uncond, noise, reference)
    error = relative_error(graph_latent, expected)
    assert error <= LATENT_TOLERANCE, f"v1.2 graph differs from the engine loop by {error:.2e}"
    # The quoted characters reach the model: without the mapping the result moves.
    cond.ctx.mapped = None
    assert relative_error(_engine_latent(dit, cond, uncond, noise, reference), expected) > 10 * LATENT_TOLERANCE


def test_prompt_format_must_fit_the_model(comfyui):
    result = comfyui.run(v12_graph(prompt_format="v1.0 / v1.1", prefix="v12_wrong"))
    assert not result.success and "set Step1X-Edit Qwen-VL Encode's prompt_format to v1.2" in result.error()
    result = comfyui.run(v12_graph(prompt_format="v1.2", dit=V11_DIT,
                                   prefix="v11_wrong"))
    assert not result.success and "prompt_format to v1.0 / v1.1" in result.error()


def t2i_graph(dit: str, qwen: str, prompt_format: str, seed: int = 3, prefix: str = "t2i") -> dict:
    return {
        "1": {"class_type": "Step1XEditDiTLoader", "inputs": {"dit_name": dit, "weight_dtype": "default",
                                                              "version": "auto"}},
        "2": {"class_type": "Step1XEditQwenVLLoader", "inputs": {"model_folder": qwen, "dtype": "auto",
                                                                 "device": "default"}},
        "3": {"class_type": "Step1XEditQwenVLEncode", "inputs": {"qwen_vl": ["2", 0], "instruction": INSTRUCTION,
                                                                 "negative": "", "prompt_format": prompt_format}},
        "4": {"class_type": "Step1XEditConnector", "inputs": {"model": ["1", 0], "embeddings": ["3", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 96, "height": 64, "batch_size": 1}},
        "6": {"class_type": "Step1XEditNormalizedCFG", "inputs": {"model": ["1", 0], "threshold": 0.0}},
        "7": {"class_type": "CFGGuider", "inputs": {"model": ["6", 0], "positive": ["4", 0], "negative": ["4", 1],
                                                    "cfg": 6.0}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "9": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "10": {"class_type": "Step1XEditScheduler", "inputs": {"latent": ["5", 0], "steps": STEPS, "denoise": 1.0}},
        "11": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["8", 0], "guider": ["7", 0],
                                                                 "sampler": ["9", 0], "sigmas": ["10", 0],
                                                                 "latent_image": ["5", 0]}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix}},
        "13": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["13", 0]}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": prefix}},
    }


@pytest.mark.parametrize("dit, qwen, prompt_format", [(V12_DIT, V12_QWEN, "v1.2"),
                                                      (V11_DIT, QWEN_FOLDER, "v1.0 / v1.1")])
def test_text_to_image_graph_runs_natively(comfyui, dit, qwen, prompt_format):
    import comfy.sample

    result = run_ok(comfyui, t2i_graph(dit, qwen, prompt_format, prefix=f"t2i_{prompt_format[:4]}"))
    latent = _saved(comfyui, result, "12")
    assert latent.shape == (1, 16, 8, 12) and torch.isfinite(latent).all()
    # The graph encodes as the engine's text-to-image does (its black square, its v1.1 encoder behaviour).
    dit_model = load_dit(comfyui.models / "diffusion_models" / dit, dtype=torch.float32)
    embedder = QwenVLEmbedder.from_pretrained(comfyui.models / "text_encoders" / qwen, dtype=torch.float32)
    cond, uncond = (DiTText(dit_model.precompute(e.hidden, e.mask, e.text_embeds, e.text_mask), e.txt_ids)
                    for e in encode_prompts(embedder, INSTRUCTION, T2I_NEGATIVE_PROMPT, dit_model.params.version))
    noise = comfy.sample.prepare_noise(torch.zeros(1, 16, 8, 12), 3)
    expected = _engine_latent(dit_model, cond, uncond, noise)
    error = relative_error(latent, expected)
    assert error <= LATENT_TOLERANCE, f"text-to-image graph differs from the engine loop by {error:.2e}"


def reflect_graph(prefix: str, rounds: int = 2, think: bool = False, instruction=INSTRUCTION) -> dict:
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
        "2": {"class_type": "Step1XEditDiTLoader", "inputs": {"dit_name": V12_DIT, "weight_dtype": "default",
                                                              "version": "auto"}},
        "3": {"class_type": "Step1XEditQwenVLLoader", "inputs": {"model_folder": V12_QWEN, "dtype": "auto",
                                                                 "device": "default", "keep_lm_head": True}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "5": {"class_type": "Step1XEditReflect", "inputs": {
            "model": ["2", 0], "qwen_vl": ["3", 0], "vae": ["4", 0], "image": ["1", 0], "instruction": instruction,
            "negative": "", "seed": 7, "steps": 1, "cfg": 6.0, "size_level": 64, "rounds": rounds, "think": think,
            "norm_cfg_threshold": 0.0, "judge_tries": 1, "max_new_tokens": 4}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["5", 1], "filename_prefix": prefix + "_all"}},
    }
    return g


def test_think_node_rewrites_with_the_tiny_mllm(comfyui):
    think = comfyui.node_class("Step1XEditThink")
    loader = comfyui.node_class("Step1XEditQwenVLLoader")
    qwen = loader.execute(V12_QWEN, "auto", "default", True).result[0]
    image = torch.rand(1, 64, 96, 3)
    first, again = think.execute(qwen, image, "make it nicer", 3), think.execute(qwen, image, "make it nicer", 3)
    assert isinstance(first.result[0], str) and first.result[0] == again.result[0]  # seeded
    assert first.ui is not None  # the rewrite is shown on the node
    without_head = loader.execute(V12_QWEN, "auto", "default").result[0]
    with pytest.raises(ValueError, match="keep_lm_head"):
        think.execute(without_head, image, "x", 3)


def test_reflect_node_runs_the_loop_and_returns_every_round(comfyui):
    """The tiny MLLM's answers are unparseable, so every verdict is the fallback (Failed): both rounds run,
    from the input, and the last is chosen (no round can be ranked)."""
    result = run_ok(comfyui, reflect_graph("reflect"))
    saved = result.outputs["7"]["images"]
    assert len(saved) == 2 and len(result.outputs["6"]["images"]) == 1
    best = Image.open(comfyui.workdir / "output" / result.outputs["6"]["images"][0]["filename"])
    assert best.size == (96, 64)  # the input's size


def test_reflect_node_refuses_other_versions(comfyui):
    g = reflect_graph("reflect_v11")
    g["2"]["inputs"]["dit_name"] = V11_DIT
    result = comfyui.run(g)
    assert not result.success and "needs a v1.2 model; this one is v1.1" in result.error()


def test_reflect_node_rounds_start_from_the_engines_noise(comfyui, monkeypatch):
    """Reflect takes its rounds and seeding from the engine: every round draws from one generator seeded with
    the node's seed, so round n starts from the same noise in ComfyUI as on the command line (the pictures
    still differ: ComfyUI's VAE Encode gives the posterior mean where the reference samples it)."""
    import comfy.sample

    from step1x_core.pipeline import EditSettings, Step1XEditPipeline
    from step1x_core.pipeline import v12_edit

    graph_noise, engine_noise = [], []
    sample_custom = comfy.sample.sample_custom
    monkeypatch.setattr(comfy.sample, "sample_custom",
                        lambda model, noise, *args, **kwargs: graph_noise.append(noise.clone())
                        or sample_custom(model, noise, *args, **kwargs))
    result = run_ok(comfyui, reflect_graph("reflect_noise", rounds=2))
    assert len(result.outputs["7"]["images"]) == 2

    draws = v12_edit.edit_draws
    monkeypatch.setattr(v12_edit, "edit_draws", lambda *args: (lambda d: engine_noise.append(d[1].clone()) or d)(
        draws(*args)))
    models = comfyui.models
    pipe = Step1XEditPipeline.from_files(models / "diffusion_models" / V12_DIT, models / "vae" / "ae.safetensors",
                                         models / "text_encoders" / V12_QWEN, device="cpu", dtype=torch.float32,
                                         reasoning=True)
    reasoned = pipe.reason(Image.open(REPO_ROOT / "tests" / "data" / "cat.png"), INSTRUCTION,
                           EditSettings(steps=1, size_level=64, seed=7, reflect=2, judge_tries=1, reasoning_tokens=4,
                                        norm_cfg_threshold=0.0))
    assert len(reasoned.run.rounds) == len(graph_noise) == len(engine_noise) == 2
    for ours, engine in zip(graph_noise, engine_noise):
        torch.testing.assert_close(ours, engine, rtol=0, atol=0)
