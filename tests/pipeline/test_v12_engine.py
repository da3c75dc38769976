"""v1.2 and text-to-image through the public entry points, on make-tiny's v1.2 release: the Python API
(``Step1XEditPipeline.from_files`` on the published transformer/ and text_encoder/ folders) and the
``step1x-edit`` command (the text encoder chosen for the DiT's version, text-to-image without --image)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_core.commands.cli import main
from step1x_core.pipeline import EditSettings
from step1x_core.release_files import find_in_models_dir
from tests.golden import REPO_ROOT
from tests.release_names import QWEN_FOLDER, V12_QWEN
from step1x_core.reasoning.report import format_run

CAT = REPO_ROOT / "tests" / "data" / "cat.png"
pytestmark = pytest.mark.slow


def test_v12_models_folder_pairs_the_dit_with_its_own_text_encoder(tiny_models):
    assert find_in_models_dir(tiny_models, "text_encoder", "v1.2").parts[-2:] == tuple(V12_QWEN.split("/"))
    assert find_in_models_dir(tiny_models, "text_encoder", "v1.1").name == QWEN_FOLDER


def test_v12_edit_is_seeded_and_keeps_the_input_size(v12_pipe):
    image = Image.open(CAT).convert("RGB")
    settings = EditSettings(steps=2, size_level=64, seed=3)
    first, again = v12_pipe(image, 'write "OPEN" on the sign', settings), v12_pipe(image, 'write "OPEN" on the sign',
                                                                                   settings)
    assert first.size == image.size and np.array_equal(np.asarray(first), np.asarray(again))
    other = v12_pipe(image, 'write "OPEN" on the sign', EditSettings(steps=2, size_level=64, seed=4))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def _count_dit_calls(pipe, run) -> int:
    calls = []
    forward = pipe.dit.forward_context
    pipe.dit.forward_context = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    try:
        run()
    finally:
        del pipe.dit.forward_context
    return len(calls)


def test_v12_edit_takes_the_official_loops_options(v12_pipe):
    """One loop, so strength, CFG truncation and the step cache work for v1.2 edits too: strength 0.5 runs the
    last half of the steps, cfg_steps=1 one guided step (two calls) and then the conditional branch alone."""
    image = Image.open(CAT).convert("RGB")
    base = dict(steps=4, size_level=64, seed=3)
    edit = lambda **options: v12_pipe(image, "make it red", EditSettings(**base, **options))  # noqa: E731
    assert _count_dit_calls(v12_pipe, edit) == 8
    assert _count_dit_calls(v12_pipe, lambda: edit(strength=0.5)) == 4
    assert _count_dit_calls(v12_pipe, lambda: edit(cfg_steps=1)) == 2 + 3
    full, half, cached = edit(), edit(strength=0.5), edit(step_cache=1e9)
    assert not np.array_equal(np.asarray(full), np.asarray(half))
    assert not np.array_equal(np.asarray(full), np.asarray(cached)) and np.asarray(cached).std() > 0


@pytest.mark.parametrize("width, height", [(100000, 64), (64, 8)])
def test_text_to_image_sizes_are_bounded_in_the_python_api_too(v12_pipe, width, height):
    with pytest.raises(ValueError, match=rf"sides must be between 16 and 4096 pixels, got {width}x{height}"):
        v12_pipe.generate("x", width, height, EditSettings(steps=2, size_level=64))


def test_text_to_image_refuses_strength(v12_pipe):
    with pytest.raises(ValueError, match="strength needs an input image"):
        v12_pipe.generate("x", 64, 64, EditSettings(steps=2, size_level=64, strength=0.5))


def test_text_to_image_returns_the_asked_size(v12_pipe):
    picture = v12_pipe.generate("a red square", 80, 48, EditSettings(steps=2, size_level=64))
    assert picture.size == (80, 48) and np.asarray(picture).std() > 0


@pytest.mark.parametrize("flow", ["edit", "text-to-image"])
def test_the_diffusers_flow_stops_at_the_first_nan_step(v12_pipe, flow):
    """As the official loop does: weights changed after the load check (as a patch would) stop the first step,
    naming the DiT, instead of an image made from NaN."""
    weight = v12_pipe.dit.final_layer.linear.bias
    saved = weight.detach().clone()
    settings = EditSettings(steps=2, size_level=64)
    try:
        with torch.no_grad():
            weight[0] = float("nan")
        with pytest.raises(ValueError, match=r"step 1 of 2 \(t=1.000\): the DiT's weights hold NaN/Inf \(e.g. final_layer"):
            if flow == "edit":
                v12_pipe(Image.open(CAT), "x", settings)
            else:
                v12_pipe.generate("x", 64, 64, settings)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_cli_v12_edit_and_text_to_image(tiny_models, tmp_path):
    edit, drawing = tmp_path / "edit.png", tmp_path / "t2i.png"
    common = ["--models-dir", str(tiny_models), "--version", "v1.2", "--size-level", "64", "--steps", "2", "--quiet"]
    assert main([*common, "--image", str(CAT), "--instruction", "add a hat", "--output", str(edit)]) == 0
    assert main([*common, "--instruction", "a hat", "--width", "64", "--height", "96", "--output", str(drawing)]) == 0
    assert Image.open(edit).size == Image.open(CAT).size and Image.open(drawing).size == (64, 96)


@pytest.mark.parametrize("args, fragment", [
    (["--version", "v1.0", "--instruction", "a hat"], "text-to-image needs a v1.1 or v1.2 DiT; this one is v1.0"),
    (["--image", str(CAT), "--width", "64", "--instruction", "x"], "--width/--height are for text-to-image"),
])
def test_cli_text_to_image_errors_are_one_line(tiny_models, tmp_path, capsys, args, fragment):
    code = main(["--models-dir", str(tiny_models), "--steps", "1", "--size-level", "64", "--quiet",
                 "--output", str(tmp_path / "o.png"), *args])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1


def test_cli_names_a_missing_v12_release(tmp_path, capsys):
    (tmp_path / "diffusion_models").mkdir()
    code = main(["--models-dir", str(tmp_path), "--version", "v1.2", "--instruction", "x", "--output",
                 str(tmp_path / "o.png")])
    assert code == 2 and "step1x-edit-download --version v1.2" in capsys.readouterr().err


def test_thinking_and_reflection_run_with_the_tiny_mllm(reasoning_pipe):
    """The real (tiny, so babbling) MLLM through the whole loop, with a small judging budget: its answers
    are unparseable, so every verdict is the reference's fallback (Failed) and each round restarts."""
    image = Image.open(CAT).convert("RGB")
    settings = EditSettings(steps=1, size_level=64, seed=1, think=True, reflect=2, judge_tries=1, reasoning_tokens=6)
    result = reasoning_pipe.reason(image, "add a hat", settings)
    assert result.rewrite is not None and result.instruction == result.rewrite.instruction
    assert len(result.run.rounds) == 2 and all(r.from_input for r in result.run.rounds)
    assert all("<#Failed>" in r.verdict.reflection for r in result.run.rounds)
    assert result.image.size == image.size
    again = reasoning_pipe.reason(image, "add a hat", settings)  # seeded: the MLLM's sampling too
    assert again.instruction == result.instruction and np.array_equal(np.asarray(again.image), np.asarray(result.image))
    assert "round 1" in format_run(result.run).lower()


def test_reasoning_needs_v12_and_the_lm_head(v12_pipe, pipe):
    with pytest.raises(ValueError, match="keep_lm_head"):
        v12_pipe.reason(Image.open(CAT), "x", EditSettings(steps=1, size_level=64, think=True))
    with pytest.raises(ValueError, match="thinking and reflection are v1.2's; this DiT is v1.1"):
        pipe(Image.open(CAT), "x", EditSettings(steps=1, size_level=64, reflect=1))


def test_cli_think_prints_the_rewrite(tiny_models, tmp_path, capsys):
    out = tmp_path / "thought.png"
    assert main(["--models-dir", str(tiny_models), "--version", "v1.2", "--image", str(CAT), "--instruction",
                 "add a hat", "--think", "--size-level", "64", "--steps", "1", "--output", str(out)]) == 0
    assert "rewritten instruction:" in capsys.readouterr().out and out.is_file()
