"""v1.2 transformer forward against the reference (the diffusers fork's Step1XEditTransformer2DModel): every
recorded call of the pipeline run, loaded from the diffusers folder and from the original-layout file."""

from __future__ import annotations

import pytest
import torch

from step1x_core.dit.loading import build_dit, read_dit_checkpoint
from step1x_core.dit.diffusers_config import read_config_file
from step1x_core.commands.bench_measure import relative_error
from tests.golden_v12 import FORWARD_TOLERANCE, golden_v12_dir, max_relative, read, sets, stem

SUFFIX = "_forward.safetensors"
FORWARD_SETS = sets(SUFFIX)


def test_v12_golden_forward_sets_present():
    if not FORWARD_SETS:
        pytest.skip(f"no v1.2 golden vectors in {golden_v12_dir()} (set STEP1X_GOLDEN_V12_DIR)")


def _model(about: dict, layout: str):
    folder = golden_v12_dir() / about["model"]
    if layout == "diffusers":
        ckpt = read_dit_checkpoint(folder)
    else:  # the original layout carries no config: the head count and RoPE split come from the folder's
        ckpt = read_dit_checkpoint(folder.with_name(folder.name + "_original.safetensors"),
                                   config=read_config_file(folder / "config.json"))
    assert ckpt.layout == layout and ckpt.params.version == "v1.2"
    return build_dit(ckpt, torch.float32)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("path", FORWARD_SETS, ids=lambda p: stem(p, SUFFIX))
@torch.inference_mode()
def test_v12_forward_matches_the_reference(path, layout):
    tensors, about = read(path)
    model = _model(about, layout)
    for call in about["calls"]:
        key = call["key"]
        inputs = {name: tensors.get(f"{key}.{name}", tensors.get(f"uncond0.{name}")) for name in
                  ("hidden_states", "timestep", "encoder_hidden_states", "prompt_embeds_mask", "txt_ids", "img_ids",
                   "text_embeddings", "text_mask")}
        ctx = model.precompute(inputs["encoder_hidden_states"], inputs["prompt_embeds_mask"],
                               inputs["text_embeddings"], inputs["text_mask"])
        out = model.forward_context(inputs["hidden_states"], inputs["img_ids"][None], inputs["txt_ids"][None],
                                    inputs["timestep"], ctx)
        expected = tensors[f"{key}.out"]
        error = max(relative_error(out, expected), max_relative(out, expected))
        assert error <= FORWARD_TOLERANCE, f"{key} ({layout}): {error:.2e} from the reference"
        if f"{key}.connector_y" in tensors:
            assert relative_error(ctx.y, tensors[f"{key}.connector_y"]) <= FORWARD_TOLERANCE
            refined = model.connector.refine(ctx, inputs["timestep"])
            assert relative_error(refined, tensors[f"{key}.connector_txt"]) <= FORWARD_TOLERANCE
            assert relative_error(refined + ctx.mapped, tensors[f"{key}.context_embedder_in"]) <= FORWARD_TOLERANCE
