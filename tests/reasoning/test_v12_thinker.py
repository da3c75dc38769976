"""v1.2's thinker talks to the MLLM exactly as the reference does, and our client is seedable.

For every ``*_thinker.json`` in ``$STEP1X_GOLDEN_V12_DIR`` (default ``<repo>/../shared/golden_v12``): the
reference's thinker was run with ``model.generate`` replaced by a stub that recorded its inputs and
returned fixed answers. We run our ``Thinker`` over ``QwenChat`` and the real tiny Qwen2.5-VL (the
golden set's own model, the one its ``<stem>_qwen_overlay`` names) with ``generate`` wrapped the same way,
and require, call by call: the same system and user texts, the same templated text and token ids (image pads
expanded), the same image grid, pixel values within float32 rounding (the reference ran transformers' fast
processor), the same generate arguments, and the same results (rewrites, reflection, scores, fallbacks).
"""

from __future__ import annotations

import functools

import json
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image

from step1x_core.qwen.folder import load_qwen_folder
from step1x_core.reasoning.chat import ChatModel
from step1x_core.reasoning.chat_inputs import chat_text
from step1x_core.reasoning.prompts import ASSETS, ChatItem
from step1x_core.reasoning.qwen_chat import QwenChat
from step1x_core.reasoning.thinker import Thinker
from tests.golden import REPO_ROOT, golden_dir, golden_v12_dir
from tests.golden_v12 import qwen_folder

GOLDEN_DIR = golden_v12_dir()
THINKER_FILES = sorted(GOLDEN_DIR.glob("*_thinker.json")) if GOLDEN_DIR.is_dir() else []
TINY_QWEN = golden_dir() / "tiny_qwen"  # the model when no set names its own (README of golden_v12)
SPEC_PROMPTS = REPO_ROOT.parent / "shared" / "spec" / "v1p2"
PIXEL_REL_TOL = 1e-5  # float32 rounding: the fast processor fuses rescale and normalise


def _golden_cases() -> list:
    return [pytest.param(path, id=path.stem) for path in THINKER_FILES] or [pytest.param(None, id="no-golden-set")]


def _load(path: Path | None) -> dict:
    if path is None:
        pytest.skip(f"no *_thinker.json in {GOLDEN_DIR} (set STEP1X_GOLDEN_V12_DIR)")
    return json.loads(path.read_text("utf-8"))


def set_qwen_folder(path: Path | None) -> Path:
    """The text encoder a thinker set ran with: the one its ``<stem>_qwen_overlay/about.json`` names (held-out sets
    bring their own), else the public tiny one."""
    if path is not None:
        set_stem = path.name.removesuffix("_thinker.json")
        if (GOLDEN_DIR / f"{set_stem}_qwen_overlay" / "about.json").is_file():
            return qwen_folder(set_stem)
    return TINY_QWEN


@functools.lru_cache(maxsize=None)
def _load_qwen(folder: Path):
    if not folder.is_dir():
        pytest.skip(f"no tiny Qwen at {folder} (set STEP1X_GOLDEN_DIR)")
    return load_qwen_folder(folder, torch.float32, keep_lm_head=True)


@pytest.fixture
def tiny_qwen(request):
    """The model of the set the test runs on (``path``), or of the first set for the tests that take none."""
    path = request.node.callspec.params.get("path") if hasattr(request.node, "callspec") else None
    return _load_qwen(set_qwen_folder(path or (THINKER_FILES[0] if THINKER_FILES else None)))


class RecordingChat(ChatModel):
    """Passes every request on and keeps it, so the test can compare what was asked."""

    def __init__(self, inner: ChatModel):
        self.inner, self.requests = inner, []

    def chat(self, system: str, content: Sequence[ChatItem], *, stage: str = "") -> str:
        answer = self.inner.chat(system, content, stage=stage)
        self.requests.append((stage, system, tuple(content), answer))
        return answer


class StubGenerate:
    """Stands in for ``model.generate`` as in the golden run: records the inputs, answers from a list."""

    def __init__(self, tokenizer, answers: Sequence[str]):
        self.tokenizer, self.answers, self.calls = tokenizer, list(answers), []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        answer = self.answers[min(len(self.calls), len(self.answers)) - 1]
        new = self.tokenizer(answer, return_tensors="pt")["input_ids"]
        eos = torch.tensor([[self.tokenizer.eos_token_id]])
        return torch.cat([kwargs["input_ids"], new, eos], dim=1)


def _images(golden: dict, path: Path) -> tuple[Image.Image, Image.Image]:
    about = golden["about"]  # e.g. "tiny_edited.png (the pipeline output)"
    return tuple(Image.open(path.parent / about[key].split()[0]) for key in ("source_image", "edited_image"))


def _client(tiny_qwen, monkeypatch, answers: Sequence[str]) -> tuple[RecordingChat, StubGenerate, QwenChat]:
    model, tokenizer, image_processor = tiny_qwen
    stub = StubGenerate(tokenizer, answers)
    monkeypatch.setattr(model, "generate", stub)
    qwen = QwenChat(model, tokenizer, image_processor, seed=0)
    return RecordingChat(qwen), stub, qwen


def _check_messages(request, call: dict) -> None:
    stage, system, content, _ = request
    golden_system, golden_user = call["messages_after_conversion"]
    assert system == golden_system["content"]
    assert len(content) == len(golden_user["content"])
    for ours, item in zip(content, golden_user["content"]):
        if item["type"] == "text":
            assert ours == item["text"], f"{stage}: the prompt text differs"
        else:  # an image, given to the reference as a PNG data URL
            assert isinstance(ours, Image.Image) and list(ours.size) == item["image"]["png_size_wh"]


def _check_pixels(pixel_values: torch.Tensor, golden: dict) -> None:
    values = pixel_values.double()
    assert list(values.shape) == golden["shape"]
    for name, ours in (("sum", values.sum()), ("sum_abs", values.abs().sum()), ("sum_sq", (values ** 2).sum())):
        assert float(ours) == pytest.approx(golden[name], rel=PIXEL_REL_TOL), name
    assert values.flatten()[:8].tolist() == pytest.approx(golden["first8"], rel=PIXEL_REL_TOL, abs=1e-6)


def _check_call(tokenizer, request, generated: dict, call: dict) -> None:
    stage = call["stage"]
    _check_messages(request, call)
    assert chat_text(tokenizer, request[1], request[2]) == call["templated_text"], stage
    assert generated["input_ids"][0].tolist() == call["input_ids"], stage
    assert int(generated["attention_mask"].sum()) == call["attention_mask_sum"]
    assert generated["image_grid_thw"].tolist() == call["image_grid_thw"]
    _check_pixels(generated["pixel_values"], call["pixel_values"])
    assert {k: v for k, v in generated.items() if not isinstance(v, torch.Tensor)} == call["generate_kwargs"]
    assert request[3] == call["returned"]


@pytest.mark.parametrize("path", _golden_cases())
def test_v12_thinker_asks_the_model_like_the_reference(path, tiny_qwen, monkeypatch):
    golden = _load(path)
    source, edited = _images(golden, path)
    calls = golden["think"]["calls"] + golden["reflect"]["calls"]
    recorder, stub, qwen = _client(tiny_qwen, monkeypatch, [call["stub_answer"] for call in calls])
    thinker = Thinker(recorder)

    for result in golden["think"]["results"]:
        assert thinker.think(source, result["instruction"]).instruction == result["returned"]
    verdict = thinker.reflect(source, edited, golden["reflect"]["instruction"])

    assert verdict.reflection == golden["reflect"]["returned"]["reflection"]
    assert verdict.scores == golden["reflect"]["returned"]["best_info"]
    assert list(verdict.decision) == golden["reflect"]["format_text(reflection)"]
    assert [request[0] for request in recorder.requests] == [call["stage"] for call in calls]
    for request, generated, call in zip(recorder.requests, stub.calls, calls, strict=True):
        _check_call(tiny_qwen[1], request, generated, call)
        assert {k: v for k, v in generated.items() if not isinstance(v, torch.Tensor)} == qwen.generate_kwargs()


@pytest.mark.parametrize("path", _golden_cases())
def test_v12_judge_falls_back_when_every_answer_is_invalid(path, tiny_qwen, monkeypatch):
    golden = _load(path)
    case = golden["reflect_all_answers_invalid"]
    source, edited = _images(golden, path)
    recorder, stub, _ = _client(tiny_qwen, monkeypatch, [case["stub_answer"]])

    verdict = Thinker(recorder).reflect(source, edited, golden["reflect"]["instruction"])

    assert dict(Counter(request[0] for request in recorder.requests)) == case["generate_calls_per_stage"]
    assert len(stub.calls) == sum(case["generate_calls_per_stage"].values())
    assert verdict.reflection == case["returned"]["reflection"]
    assert verdict.scores == case["returned"]["best_info"]
    assert list(verdict.decision) == case["format_text(reflection)"]
    assert verdict.fallbacks == ["consistency", "score1", "score2"]


def test_v12_seeded_chat_is_reproducible_and_leaves_the_global_rng_alone(tiny_qwen):
    model, tokenizer, image_processor = tiny_qwen
    image = Image.new("RGB", (96, 64), (200, 40, 40))
    chat = QwenChat(model, tokenizer, image_processor, seed=7, max_new_tokens=6)
    ask = ("You are a helpful assistant.", [image, "Describe the image."])
    torch.manual_seed(1234)
    before = torch.get_rng_state()

    first = [chat.chat(*ask), chat.chat(*ask)]
    chat.reseed(7)
    again = [chat.chat(*ask), chat.chat(*ask)]
    others = []
    for seed in (8, 9):
        chat.reseed(seed)
        others.append(chat.chat(*ask))

    assert torch.equal(torch.get_rng_state(), before), "the chat consumed the caller's global RNG"
    assert first == again
    assert len({first[0], *others}) > 1, "different seeds always gave the same answer"
    # A generator works as the seed source as well, drawing one seed per call.
    chat.reseed(torch.Generator().manual_seed(7))
    assert [chat.chat(*ask), chat.chat(*ask)] == first


def test_v12_generate_merges_the_checkpoints_generation_config(tiny_qwen, tmp_path):
    """The reference passes only top-p and temperature; transformers adds the checkpoint's
    generation_config.json (v1.2's is Qwen2.5-VL's stock file: repetition penalty 1.05) and top-k 50."""
    folder = tmp_path / "tiny_qwen"
    shutil.copytree(TINY_QWEN, folder)
    stock = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
             "repetition_penalty": 1.05, "temperature": 1e-06, "transformers_version": "4.55.0"}
    (folder / "generation_config.json").write_text(json.dumps(stock))
    model, tokenizer, image_processor = load_qwen_folder(folder, torch.float32, keep_lm_head=True)
    chat = QwenChat(model, tokenizer, image_processor)
    config, _ = model._prepare_generation_config(None, **chat.generate_kwargs())
    effective = {name: getattr(config, name) for name in
                 ("repetition_penalty", "top_k", "top_p", "temperature", "do_sample", "max_new_tokens", "eos_token_id")}
    assert effective == {"repetition_penalty": 1.05, "top_k": 50, "top_p": 0.9, "temperature": 0.7, "do_sample": True,
                         "max_new_tokens": 128, "eos_token_id": 151645}


def test_v12_chat_needs_the_lm_head(tiny_qwen):
    _, tokenizer, image_processor = tiny_qwen
    without_head = load_qwen_folder(TINY_QWEN, torch.float32)[0]
    with pytest.raises(ValueError, match="keep_lm_head=True"):
        QwenChat(without_head, tokenizer, image_processor)


def test_v12_prompt_files_are_the_specs_bytes():
    if not SPEC_PROMPTS.is_dir():
        pytest.skip(f"no prompt specification at {SPEC_PROMPTS}")
    packaged = sorted(p.name for p in ASSETS.iterdir() if p.name != "README.md")
    assert packaged, "no packaged prompt files"
    for name in packaged:
        assert (ASSETS / name).read_bytes() == (SPEC_PROMPTS / name).read_bytes(), name
    expected = {p.name for p in SPEC_PROMPTS.iterdir() if p.name.startswith(("thinker_", "preview_cn_"))}
    assert expected <= set(packaged)


@pytest.mark.parametrize(("size", "final", "tokens"), [
    ((1920, 1080), (1036, 588), 777),   # thumbnail to 1024x576, qwen_vl_utils' 1036x588, already in limits
    ((1024, 1024), (896, 896), 1024),   # 1036x1036 first (upscaled), then down into 896^2 by the processor
    ((96, 64), (644, 420), 345),        # 84x56 first, then up to the 512^2 minimum
    ((3000, 500), (1288, 224), 368),    # thumbnail 1024x171, 1036x168 (below the minimum), up to 1288x224
])
def test_v12_thinker_image_sizes(size, final, tokens):
    """The spec's examples (6.2) of what the MLLM sees; the thumbnail and both resizes in turn."""
    from step1x_core.qwen.packaged import PACKAGED_CONFIG
    from step1x_core.qwen.vision_input import load_image_processor
    from step1x_core.reasoning.chat_inputs import thinker_image, thinker_image_processor

    processor = thinker_image_processor(load_image_processor(PACKAGED_CONFIG))
    image = thinker_image(Image.new("RGB", size, (90, 120, 30)), processor)
    assert image.size == final
    grid = processor(images=[image], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) // 4 == tokens


def test_v12_chat_gives_qwen_its_3d_positions(tiny_qwen, monkeypatch):
    """The reference (transformers 4.55) places image tokens on Qwen's 3-D rotary grid; transformers >= 5.3
    does so only when given mm_token_type_ids, else it silently numbers them 0..L-1."""
    from step1x_core.qwen.transformers_versions import mrope_position_ids, sequential_position_ids

    model, tokenizer, image_processor = tiny_qwen
    stub = StubGenerate(tokenizer, ["ok"])
    monkeypatch.setattr(model, "generate", stub)
    QwenChat(model, tokenizer, image_processor).chat("Be brief.", [Image.new("RGB", (64, 64), (9, 99, 199)), "What?"])
    tensors = {k: v for k, v in stub.calls[0].items() if isinstance(v, torch.Tensor)}
    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    plain = {k: tensors[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    with torch.no_grad():
        as_generated = model(**tensors).logits
        grid = model(**plain, position_ids=mrope_position_ids(model, ids, tensors["image_grid_thw"], mask)).logits
        sequential = model(**plain, position_ids=sequential_position_ids(ids)).logits
    assert torch.allclose(as_generated, grid, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(as_generated, sequential, rtol=1e-3, atol=1e-3)
