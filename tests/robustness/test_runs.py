"""Runs in a row: interrupting, changing inputs, many edits in one process, model files replaced on disk.

Already covered elsewhere: ComfyUI's interrupt after the first step followed by a successful run, an
identical second run reusing every node, a new seed re-running only the sampler and what follows
(tests/comfyui/test_comfyui_nodes.py); the pipeline's callback stopping a run (tests/pipeline/test_pipeline.py).
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_core.commands.cli import main
from step1x_core.pipeline import EditSettings
from step1x_core.testing.factory import TEXT_GAIN
from step1x_core.testing.tiny_dit import write_tiny_dit
from step1x_core.testing.tiny_qwen import write_tiny_qwen
from tests.robustness.helpers import CAT, PREFIX, graph, rss_mb, run_ok, save_input, saved_latent
from tests.release_names import QWEN_FOLDER as QWEN

RSS_GROWTH_LIMIT_MB = 100  # after warm-up, over 50 edits


def _cat() -> Image.Image:
    return Image.open(CAT).convert("RGB")


# ---- interrupting -------------------------------------------------------------------------------------


def test_engine_interrupt_mid_sampling_then_run_again(pipe):
    settings = EditSettings(steps=3, size_level=32, cfg_scale=1.0, seed=4)
    clean = np.asarray(pipe(_cat(), "add a red hat", settings))

    def interrupt(step, steps, x):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe(_cat(), "add a red hat", settings, callback=interrupt)
    assert np.array_equal(np.asarray(pipe(_cat(), "add a red hat", settings)), clean)


def test_comfyui_run_after_an_interrupt_equals_an_uninterrupted_run(comfyui):
    import comfy.model_management

    def edit(seed):
        return graph(seed=seed, steps=4, cfg=1.0, size=32, prefix="interrupt")

    clean = saved_latent(comfyui, run_ok(comfyui, edit(61)))
    run_ok(comfyui, edit(62))  # so that the sampler of seed 61 is not served from ComfyUI's cache

    def interrupt_at_step_two(value, total):
        if value == 2:
            comfy.model_management.interrupt_current_processing(True)

    comfyui.step_hook = interrupt_at_step_two
    try:
        interrupted = comfyui.run(edit(61))
    finally:
        comfyui.step_hook = None
    assert not interrupted.success and "10" not in interrupted.executed_nodes()
    again = run_ok(comfyui, edit(61))
    assert "9" in again.executed_nodes()  # the interrupted sampler runs again, not from a cache
    torch.testing.assert_close(saved_latent(comfyui, again), clean, rtol=0, atol=0)


# ---- changing one input -------------------------------------------------------------------------------

UPSTREAM = {"1", "2", "3", "4", "5", "6", "7", "8"}  # image, scale, loaders, encode, connector, VAEEncode
SAMPLE_ON = {"9", "10", "11", "12", "13"}  # sampler, decode, restore, save image, save latent


@pytest.mark.parametrize("change, reruns", [
    ({"6": {"instruction": "make it night"}}, {"6", "7"} | SAMPLE_ON),
    ({"2": {"custom_size": 48}}, {"2", "6", "7", "8"} | SAMPLE_ON),
    ({"9": {"steps": 2}}, SAMPLE_ON),
    ({"9": {"cfg": 3.0}}, SAMPLE_ON),
    ({"11": {"resample": "lanczos"}}, {"11", "12"}),
    ({"12": {"filename_prefix": f"{PREFIX}_renamed"}}, {"12"}),
    ({"1": {"image": "flipped"}}, {"1", "2", "6", "7", "8"} | SAMPLE_ON),
])
def test_comfyui_change_one_input_reruns_only_what_depends_on_it(comfyui, change, reruns):
    flipped = save_input(comfyui, _cat().transpose(Image.Transpose.FLIP_LEFT_RIGHT), "rerun_flipped.png")
    base = graph(seed=71, steps=1, size=32, prefix="rerun")
    run_ok(comfyui, base)
    changed = graph(seed=71, steps=1, size=32, prefix="rerun")
    for node, inputs in change.items():
        changed[node]["inputs"].update({k: flipped if v == "flipped" else v for k, v in inputs.items()})
    result = run_ok(comfyui, changed)
    assert result.executed_nodes() == reruns, change
    assert (UPSTREAM | SAMPLE_ON) - reruns <= result.cached_nodes(), change


# ---- many edits in one process ------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc")
def test_fifty_comfyui_edits_keep_memory_flat(comfyui):
    def edit(i: int) -> None:
        prompt = graph(seed=1000 + i, instruction=f"edit number {i // 10}", steps=1, cfg=1.0, size=32,
                       prefix="fifty")
        del prompt["13"]  # only the PNG
        assert {"9", "10", "12"} <= run_ok(comfyui, prompt).executed_nodes()  # a real edit, not a cache hit

    for i in range(-5, 0):  # warm-up: first allocations, caches, allocator pools
        edit(i)
    gc.collect()
    before, start = rss_mb(), time.perf_counter()
    for i in range(50):
        edit(i)
    gc.collect()
    after, seconds = rss_mb(), time.perf_counter() - start
    print(f"\n50 ComfyUI edits (seed each time, instruction every 10th): RSS {before:.1f} MiB -> {after:.1f} MiB "
          f"({after - before:+.1f} MiB) in {seconds:.0f} s")
    assert after - before < RSS_GROWTH_LIMIT_MB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc")
@pytest.mark.slow
def test_twenty_engine_edits_keep_memory_flat(pipe):
    settings = [EditSettings(steps=1, size_level=32, cfg_scale=1.0, seed=i) for i in range(25)]
    for s in settings[:5]:
        pipe(_cat(), "add a red hat", s)
    gc.collect()
    before = rss_mb()
    for s in settings[5:]:
        pipe(_cat(), "add a red hat", s)
    gc.collect()
    after = rss_mb()
    print(f"\n20 engine edits: RSS {before:.1f} MiB -> {after:.1f} MiB ({after - before:+.1f} MiB)")
    assert after - before < RSS_GROWTH_LIMIT_MB


# ---- a model file replaced on disk --------------------------------------------------------------------


def _replace_with_dit(path, seed: int) -> None:
    """What a re-download does: write a new file beside the old one, then rename it over it."""
    fresh = path.with_name(path.name + ".partial")
    write_tiny_dit(fresh, "v1.1", seed=seed, text_hidden=64, text_gain=TEXT_GAIN)
    os.replace(fresh, path)


def test_comfyui_reloads_a_dit_replaced_on_disk(comfyui):
    folder = comfyui.models / "diffusion_models"
    swap, copy = folder / f"{PREFIX}-swap.safetensors", folder / f"{PREFIX}-swap-copy.safetensors"
    try:
        _replace_with_dit(swap, seed=1)
        first = saved_latent(comfyui, run_ok(comfyui, graph(dit=swap.name, seed=81, steps=1, size=32, prefix="swap")))
        _replace_with_dit(swap, seed=7)
        shutil.copy(swap, copy)
        second = saved_latent(comfyui, run_ok(comfyui, graph(dit=swap.name, seed=81, steps=1, size=32,
                                                             prefix="swap")))
        fresh = saved_latent(comfyui, run_ok(comfyui, graph(dit=copy.name, seed=81, steps=1, size=32,
                                                            prefix="swap")))
        assert not torch.equal(second, first), "the replaced file was not reloaded (stale model)"
        torch.testing.assert_close(second, fresh, rtol=0, atol=0)
    finally:
        swap.unlink(missing_ok=True)
        copy.unlink(missing_ok=True)
        comfyui.invalidate_file_lists()


def test_comfyui_reloads_qwen_weights_replaced_on_disk(comfyui, tmp_path):
    folder = Path(shutil.copytree(comfyui.models / "text_encoders" / QWEN, comfyui.models / "text_encoders" /
                                  f"{PREFIX}-qwen-swap"))
    try:
        def edit():
            prompt = graph(seed=82, steps=1, size=32, prefix="swap")
            prompt["4"]["inputs"]["model_folder"] = folder.name
            return saved_latent(comfyui, run_ok(comfyui, prompt))

        first = edit()
        other = write_tiny_qwen(tmp_path / "other", seed=3)
        os.replace(other / "model.safetensors", folder / "model.safetensors")
        assert not torch.equal(edit(), first), "the replaced weights were not reloaded (stale encoder)"
    finally:
        shutil.rmtree(folder)
        comfyui.invalidate_file_lists()


@pytest.mark.slow
def test_cli_reads_a_dit_replaced_on_disk(tiny_models, tmp_path):
    dit = tmp_path / "dit.safetensors"

    def edit(name: str) -> np.ndarray:
        out = tmp_path / name
        assert main(["--models-dir", str(tiny_models), "--dit", str(dit), "--image", str(CAT), "--instruction", "x",
                     "--output", str(out), "--size-level", "32", "--steps", "1", "--cfg", "1", "--quiet"]) == 0
        return np.asarray(Image.open(out))

    _replace_with_dit(dit, seed=1)
    first = edit("first.png")
    _replace_with_dit(dit, seed=7)
    assert not np.array_equal(edit("second.png"), first)  # every run loads the files afresh
