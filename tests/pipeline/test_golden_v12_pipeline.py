"""Whole runs against the diffusers port: a v1.2 edit (schedule, VAE posterior sample, noise, every CFG step,
the decoded picture) and v1.1 text-to-image. Every set in the golden directory runs the same way."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_core.dit.loading import load_dit
from step1x_core.pipeline import EditSettings, Step1XEditPipeline
from step1x_core.pipeline.text_to_image import text_to_image
from step1x_core.pipeline.v12_edit import edit_v12
from step1x_core.qwen.embedder import QwenVLEmbedder
from step1x_core.sampling.diffusers import cpu_generator, diffusers_schedule
from step1x_core.vae.loader import load_vae
from step1x_core.commands.bench_measure import relative_error
from tests.golden_v12 import RUN_TOLERANCE, golden_v12_dir, max_relative, model_path, qwen_folder, read, sets, stem

PIPELINE_SETS = sets("_pipeline.safetensors")
T2I_SETS = sets("_v11_t2i.safetensors")


def test_v12_golden_run_sets_present():
    if not PIPELINE_SETS or not T2I_SETS:
        pytest.skip(f"no v1.2 golden runs in {golden_v12_dir()} (set STEP1X_GOLDEN_V12_DIR)")


def _pipeline(about: dict, set_stem: str) -> Step1XEditPipeline:
    dit = load_dit(model_path(about, "transformer"), dtype=torch.float32)
    vae = load_vae(model_path(about, "vae"))
    embedder = QwenVLEmbedder.from_pretrained(qwen_folder(set_stem), dtype=torch.float32)
    return Step1XEditPipeline(dit, vae, embedder, device="cpu", dtype=torch.float32)


def _assert_close(ours, expected, what: str, tolerance: float = RUN_TOLERANCE) -> None:
    error = max(relative_error(ours, expected), max_relative(ours, expected))
    assert error <= tolerance, f"{what}: {error:.2e} from the reference"


def _assert_picture(ours: Image.Image, expected: np.ndarray, what: str) -> None:
    """8-bit output: the same size, and every channel within one level (float32 rounding at .5 boundaries)."""
    ours = np.asarray(ours.convert("RGB")).astype(int)
    assert ours.shape == expected.shape, what
    assert np.abs(ours - expected.astype(int)).max() <= 1, what


@pytest.mark.parametrize("path", PIPELINE_SETS, ids=lambda p: stem(p, "_pipeline.safetensors"))
def test_v12_edit_matches_the_reference_run(path):
    tensors, about = read(path)
    call = about["call"]
    set_stem = stem(path, "_pipeline.safetensors")
    pipe = _pipeline(about, set_stem)
    image = Image.open(golden_v12_dir() / f"{set_stem}_image.png").convert("RGB")
    settings = EditSettings(steps=call["num_inference_steps"], cfg_scale=call["true_cfg_scale"],
                            size_level=call["size_level"])
    sigmas, timesteps = diffusers_schedule(settings.steps, about["target_tokens"])
    assert torch.equal(sigmas, tensors["sigmas"]) and torch.equal(timesteps, tensors["timesteps"])
    steps = []
    seed = int(call["generator"].split("manual_seed(")[1].rstrip(")"))
    result = edit_v12(pipe, image, call["prompt"], settings, cpu_generator(seed),
                      callback=lambda i, n, latents: steps.append(latents.clone()))
    for i, latents in enumerate(steps):
        _assert_close(latents, tensors[f"step{i}.latents"], f"step {i}")
    _assert_close(result.latent, tensors["final_latents"], "final latents")
    _assert_picture(result.image, np.asarray(Image.open(golden_v12_dir() / f"{set_stem}_edited.png").convert("RGB")),
                    "edited picture")
    # The public API gives the same picture.
    _assert_picture(pipe(image, call["prompt"], dataclasses.replace(settings, seed=seed)), np.asarray(result.image),
                    "pipeline call")


@pytest.mark.parametrize("path", T2I_SETS, ids=lambda p: stem(p, "_v11_t2i.safetensors"))
def test_v11_text_to_image_matches_the_reference_run(path):
    tensors, about = read(path)
    call = about["call"]
    set_stem = stem(path, "_v11_t2i.safetensors")
    pipe = _pipeline({"models": {"transformer": about["models"]["transformer"], "vae": about["models"]["vae"]}},
                     set_stem)
    settings = EditSettings(steps=call["num_inference_steps"], cfg_scale=call["true_cfg_scale"])
    steps = []
    seed = int(call["generator"].split("manual_seed(")[1].rstrip(")"))
    result = text_to_image(pipe, call["prompt"], call["width"], call["height"], settings, cpu_generator(seed),
                           callback=lambda i, n, latents: steps.append(latents.clone()))
    for i, latents in enumerate(steps):
        _assert_close(latents, tensors[f"step{i}.latents"], f"step {i}")
    _assert_close(result.latent, tensors["final_latents"], "final latents")
    _assert_picture(result.image, tensors["output_rgb"].numpy(), "picture")


LOOP_SETS = sets("_reflect_loop.safetensors")


@pytest.mark.parametrize("path", LOOP_SETS, ids=lambda p: stem(p, "_reflect_loop.safetensors"))
def test_v12_thinking_and_reflection_loop_matches_the_reference_run(path):
    """The whole loop with the reference's scripted judge answers: each try's prompt and input image, its
    final latents (one generator across tries), the picture, and the chosen try."""
    from step1x_core.reasoning.chat import ScriptedChat

    tensors, about = read(path)
    set_stem = stem(path, "_reflect_loop.safetensors")
    _, pipeline_about = read(golden_v12_dir() / f"{set_stem}_pipeline.safetensors")
    call = pipeline_about["call"]
    pipe = _pipeline(pipeline_about, set_stem)
    image = Image.open(golden_v12_dir() / f"{set_stem}_image.png").convert("RGB")
    seed = int(call["generator"].split("manual_seed(")[1].rstrip(")"))
    settings = EditSettings(steps=call["num_inference_steps"], cfg_scale=call["true_cfg_scale"],
                            size_level=call["size_level"], seed=seed, think=True, reflect=len(about["tries"]))
    result = pipe.reason(image, call["prompt"], settings, chat=ScriptedChat(about["scripted_answers"]))

    assert result.instruction == about["reformat_prompt"]
    assert [r.prompt for r in result.run.rounds] == [t["prompt"] for t in about["tries"]]
    assert [r.verdict.reflection for r in result.run.rounds] == about["think_info"]
    assert [r.verdict.scores for r in result.run.rounds] == about["best_info"]
    for index, latents in enumerate(result.latents):
        _assert_close(latents, tensors[f"try{index}.final_latents"], f"try {index}")
        _assert_picture(result.run.rounds[index].output, tensors[f"try{index}.output_rgb"].numpy(), f"try {index}")
    assert result.run.chosen == about["final_image_index"][0]
    assert result.image is result.run.rounds[result.run.chosen].output
