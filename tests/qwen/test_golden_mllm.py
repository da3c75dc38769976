"""Qwen-VL embedder against the official embedder's golden outputs.

For every ``<name>_mllm.safetensors`` in ``$STEP1X_GOLDEN_DIR`` (default: ``<repo>/../shared/golden``) with its
model folder (metadata ``model_folder``, else ``<name>_qwen/``): for each prompt of the metadata and the
``image`` tensor, the token ids and masks must be identical and the features must match.

How the golden set was made, found by measurement: the official code ran on the transformers version
recorded in the model folder's config.json (5.23 for shared/golden: "Picture 1: " in the prompt,
torchvision's image resize and plain sequential positions, ``AS_TRANSFORMERS_5_3``); the test reproduces
whichever version a set records (``behaviour_for_transformers``). The official code wrote the float32 features into its bfloat16 output buffer. So the features
are compared in float32 against the bfloat16 rounding interval around each golden value: the part of our
float32 result that lies outside that interval must be <= 1e-5 of the golden norm.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.golden import golden_dir
from step1x_core.qwen.embedder import QwenVLEmbedder
from step1x_core.qwen.transformers_versions import OfficialBehaviour, behaviour_for_transformers
from step1x_core.testing.tiny_qwen import comfy_single_file_tensors, write_comfy_single_file
from tests.release_names import QWEN_FILE

GOLDEN_DIR = golden_dir()
GOLDEN_FILES = sorted(GOLDEN_DIR.glob("*_mllm.safetensors")) if GOLDEN_DIR.is_dir() else []
REL_TOL = 1e-5


def _metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as handle:
        return json.loads(handle.metadata()["about"])


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _model_folder(path: Path) -> Path:
    name = _metadata(path).get("model_folder") or path.name.removesuffix("_mllm.safetensors") + "_qwen"
    return path.parent / name


def _golden_behaviour(folder: Path) -> OfficialBehaviour:
    """The official embedder's behaviour under the transformers version that saved the golden model."""
    config = json.loads((folder / "config.json").read_text())
    return behaviour_for_transformers(config.get("transformers_version", "5.23.0"))


@functools.lru_cache(maxsize=None)
def _float32_embedder(folder: Path) -> QwenVLEmbedder:
    """The golden set's behaviour, but returning the float32 features before the bf16 buffer."""
    behaviour = dataclasses.replace(_golden_behaviour(folder), bf16_buffer=False)
    return QwenVLEmbedder.from_pretrained(folder, dtype=torch.float32, device="cpu", behaviour=behaviour)


def _bf16_rounding_excess(ours: torch.Tensor, golden: torch.Tensor) -> torch.Tensor:
    """How far each float32 value lies outside the interval that rounds to the golden bf16 value."""
    golden_bf16 = golden.to(torch.bfloat16)
    assert torch.equal(golden_bf16.float(), golden), "golden features are expected to be bf16 values"
    above = torch.nextafter(golden_bf16, torch.full_like(golden_bf16, float("inf"))).float()
    below = torch.nextafter(golden_bf16, torch.full_like(golden_bf16, float("-inf"))).float()
    lower, upper = (below + golden) / 2, (golden + above) / 2
    return (lower - ours).clamp_min(0) + (ours - upper).clamp_min(0)


# One skipped case when there is nothing to compare against.
GOLDEN_CASES = GOLDEN_FILES or [None]


def _require_golden(golden_path: Path | None) -> Path:
    if golden_path is None:
        pytest.skip(f"no *_mllm.safetensors golden files in {GOLDEN_DIR} (set STEP1X_GOLDEN_DIR to run these)")
    return golden_path


def _assert_matches_golden(embedder: QwenVLEmbedder, golden_path: Path) -> None:
    golden = _tensors(golden_path)
    prompts = _metadata(golden_path)["prompts"]
    assert prompts, f"{golden_path.name} lists no prompts"

    for index, prompt in enumerate(prompts):
        expected_ids = golden[f"p{index}.input_ids"]
        expected_mask = golden[f"p{index}.mask"]
        expected_embs = golden[f"p{index}.embs"]

        ids = embedder.token_ids(prompt, golden["image"])
        assert torch.equal(ids, expected_ids), f"prompt {index} ({prompt!r}): token ids differ"

        encoded = embedder([prompt], [golden["image"]])
        embs, masks = encoded.hidden, encoded.mask
        assert torch.equal(masks[0], expected_mask), f"prompt {index} ({prompt!r}): masks differ"

        kept = int(expected_mask.sum())
        assert torch.count_nonzero(embs[0, kept:]) == 0 and torch.count_nonzero(expected_embs[kept:]) == 0
        ours, reference = embs[0, :kept], expected_embs[:kept]
        excess = _bf16_rounding_excess(ours, reference)
        relative = (excess.norm() / reference.norm()).item()
        assert relative <= REL_TOL, f"prompt {index} ({prompt!r}): {relative:.3g} beyond bf16 rounding"
        # Elementwise: within half a bf16 step (<= 2**-8 relative) plus float32 noise.
        torch.testing.assert_close(ours, reference, rtol=2**-8, atol=1e-5)


@pytest.mark.parametrize("golden_path", GOLDEN_CASES, ids=lambda p: p.name if p else "none")
def test_embedder_matches_golden(golden_path: Path | None) -> None:
    golden_path = _require_golden(golden_path)
    folder = _model_folder(golden_path)
    assert folder.is_dir(), f"golden {golden_path.name} has no model folder {folder}"
    _assert_matches_golden(_float32_embedder(folder), golden_path)


@pytest.mark.parametrize("golden_path", GOLDEN_CASES, ids=lambda p: p.name if p else "none")
def test_single_file_matches_golden(golden_path: Path | None, tmp_path: Path) -> None:
    """The golden model's weights as one ComfyUI-layout file (no lm_head, the pack's tokenizer and processor
    settings) reproduce the official embedder too."""
    golden_path = _require_golden(golden_path)
    folder = _model_folder(golden_path)
    tensors = comfy_single_file_tensors(load_file(str(folder / "model.safetensors")))
    config = json.loads((folder / "config.json").read_text())
    single_file = write_comfy_single_file(tmp_path / QWEN_FILE, tensors, config)
    behaviour = dataclasses.replace(_golden_behaviour(folder), bf16_buffer=False)
    embedder = QwenVLEmbedder.from_pretrained(single_file, dtype=torch.float32, behaviour=behaviour)
    _assert_matches_golden(embedder, golden_path)


@pytest.mark.parametrize("golden_path", GOLDEN_CASES, ids=lambda p: p.name if p else "none")
def test_bf16_buffer_reproduces_golden_values(golden_path: Path | None) -> None:
    """With the official bf16 buffer the stored values themselves come out; only values sitting on a
    rounding boundary may land one bf16 step away."""
    golden_path = _require_golden(golden_path)
    float32_embedder = _float32_embedder(_model_folder(golden_path))
    embedder = QwenVLEmbedder(
        float32_embedder.model,
        float32_embedder.tokenizer,
        float32_embedder.image_processor,
        behaviour=_golden_behaviour(_model_folder(golden_path)),
    )
    golden = _tensors(golden_path)
    prompt = _metadata(golden_path)["prompts"][0]
    embs = embedder([prompt], [golden["image"]]).hidden
    reference = golden["p0.embs"]
    differing = embs[0] != reference
    assert differing.float().mean() <= 1e-3, f"{int(differing.sum())} of {reference.numel()} values differ"
    step = (torch.nextafter(reference.bfloat16(), embs[0].bfloat16()).float() - reference).abs()
    assert torch.equal((embs[0] - reference).abs()[differing], step[differing]), "a value is off by > 1 bf16 step"
