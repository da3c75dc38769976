"""The DiT, connector and whole sampling loop against the official implementation's outputs.

Runs over every `*_vectors.safetensors` in the golden directory with its `*_dit.safetensors`, so
held-back sets (other versions, sizes, thresholds) are checked the same way.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from step1x_core.dit.loading import load_dit
from step1x_core.sampling.loop import DiTText, Guidance, denoise
from step1x_core.sampling.latents import edit_ids, pack
from step1x_core.sampling.official import OfficialFlow, get_schedule
from step1x_core.commands.bench_measure import relative_error
from tests.golden import golden_dir

TOLERANCE = 1e-5
VECTOR_FILES = sorted(golden_dir().glob("*_vectors.safetensors"))


def _case_id(path):
    return path.name.removesuffix("_vectors.safetensors")


@pytest.fixture(params=VECTOR_FILES, ids=_case_id, scope="module")
def golden_case(request):
    vectors_path = request.param
    dit_path = vectors_path.with_name(vectors_path.name.replace("_vectors.", "_dit."))
    with safe_open(str(vectors_path), "pt") as f:
        about = json.loads(f.metadata()["about"])
    model = load_dit(dit_path, dtype=torch.float32)
    return model, load_file(str(vectors_path)), about


def test_golden_vectors_present():
    if not golden_dir().is_dir():
        pytest.skip(f"no golden directory at {golden_dir()} (set STEP1X_GOLDEN_DIR)")
    assert VECTOR_FILES, f"no *_vectors.safetensors in {golden_dir()}"


def test_version_detected(golden_case):
    model, _, about = golden_case
    assert model.params.version == about["version"]


@torch.no_grad()
def test_connector(golden_case):
    model, v, _ = golden_case
    txt, y = model.connector(v["llm_embedding"], v["forward.t"], v["mask"])
    assert relative_error(txt, v["connector.txt"]) <= TOLERANCE
    assert relative_error(y, v["connector.y"]) <= TOLERANCE


@torch.no_grad()
def test_forward(golden_case):
    model, v, _ = golden_case
    img = v["forward.img"]
    txt_ids = torch.zeros(img.shape[0], v["llm_embedding"].shape[1], 3)
    out = model(img=img, img_ids=v["forward.img_ids"], txt_ids=txt_ids, timesteps=v["forward.t"],
                llm_embedding=v["llm_embedding"], t_vec=v["forward.t"], mask=v["mask"])
    assert out.shape == v["forward.out"].shape
    assert relative_error(out, v["forward.out"]) <= TOLERANCE


@torch.no_grad()
def test_forward_ids_follow_version(golden_case):
    """The golden forward's position ids are the ones our sampler builds for that version."""
    model, v, about = golden_case
    h, w = about["latent_hw"]
    img_ids, _ = edit_ids(h, w, batch=v["forward.img"].shape[0], version=about["version"], text_tokens=1)
    torch.testing.assert_close(img_ids, v["forward.img_ids"], rtol=0, atol=0)


@torch.no_grad()
def test_denoise_loop(golden_case):
    model, v, about = golden_case
    cfg = about["denoise"]
    noise, ref = v["noise"], v["ref_latent"]
    h, w = noise.shape[-2:]
    target, reference = pack(noise), pack(ref)
    timesteps = get_schedule(cfg["steps"], target.shape[1])
    torch.testing.assert_close(torch.tensor(timesteps, dtype=torch.float64), v["denoise.timesteps"], rtol=0, atol=0)
    img_ids, txt_ids = edit_ids(h, w, batch=2, version=about["version"], text_tokens=v["llm_embedding"].shape[1])
    text = DiTText(model.connector.precompute(v["llm_embedding"], v["mask"]), txt_ids)
    out = denoise(model, OfficialFlow(timesteps), target, img_ids, text.select(0), text.select(1),
                  Guidance(cfg["cfg"], cfg["timesteps_truncate"]), reference=reference)
    assert relative_error(out, v["denoise.out_tokens"]) <= TOLERANCE
