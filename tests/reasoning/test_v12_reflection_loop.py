"""The v1.2 reflection loop's control flow, with a scripted judge and a real (simple) image edit.

The judge is ``ScriptedChat`` (the tiny model's answers are random); the edit blends the image with a
colour derived from the instruction, so every output shows which image and which instruction made it.
Then the control flow of the golden reflect-loop sets (``*_reflect_loop.safetensors``: scripted answers,
the prompt of each try, the verdicts, scores and the chosen try), with that stand-in edit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image, ImageChops
from safetensors import safe_open

from step1x_core.reasoning.chat import ScriptedChat
from step1x_core.reasoning.loop import best_round, run_reflection
from step1x_core.reasoning.thinker import Thinker
from tests.golden import golden_v12_dir
from step1x_core.reasoning.report import format_run

GOLDEN_DIR = golden_v12_dir()
LOOP_FILES = sorted(GOLDEN_DIR.glob("*_reflect_loop.safetensors")) if GOLDEN_DIR.is_dir() else []

INSTRUCTION = "add a red hat to the cat"
CONSISTENCY = ('{"meets_instruction": "partial", "major_conflicts": 0, "minor_conflicts": 1, "omissions": 0, '
               '"raw_score": 6, "reason": "The hat is small."}')
REFLECT = "<#Think> The hat is too small. <#Reflection> Make the hat twice as big."
FAIL = "<#Think> The cat turned into a dog. <#Failed>"
SUCCEED = "<#Think> A red hat sits on the cat. <#Success>"
OTHERS = "<#Think> The request is unclear. <#Others>"


def tint(image: Image.Image, instruction: str) -> Image.Image:
    """A deterministic edit: blend with a colour from the instruction's hash."""
    colour = tuple(hashlib.sha256(instruction.encode("utf-8")).digest()[:3])
    return Image.blend(image.convert("RGB"), Image.new("RGB", image.size, colour), 0.25)


def scores(*pairs: tuple[list, list]) -> dict[str, list[str]]:
    return {"score1": [json.dumps({"score": s1, "reasoning": "edit"}) for s1, _ in pairs],
            "score2": [json.dumps({"score": s2, "reasoning": "image"}) for _, s2 in pairs]}


def judge(reflections: list[str], score_pairs=(([5, 5], [5, 5]),), reformat=("Put a red hat on the cat.",)):
    return ScriptedChat({"reformat": list(reformat), "describe": ["A cat wearing a red hat."],
                         "consistency": [CONSISTENCY], "reflection": reflections, **scores(*score_pairs)})


@pytest.fixture
def image() -> Image.Image:
    return Image.new("RGB", (64, 48), (30, 90, 160))


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None


def test_v12_reflection_edits_the_previous_output_with_the_new_instruction(image):
    chat = judge([REFLECT, SUCCEED])
    run = run_reflection(tint, image, INSTRUCTION, Thinker(chat))

    assert [r.prompt for r in run.rounds] == [INSTRUCTION, " Make the hat twice as big."]  # not stripped
    assert [r.from_input for r in run.rounds] == [True, False]
    assert same(run.images[0], tint(image, INSTRUCTION))
    assert same(run.images[1], tint(run.images[0], " Make the hat twice as big."))
    assert run.reflections == [REFLECT, SUCCEED]
    # The judge always compares with the input image and the original instruction.
    for call in chat.calls:
        if call.stage in ("describe", "reflection", "score1"):
            assert call.content[0] is image
        if call.stage in ("describe", "reflection", "score1", "consistency"):
            assert INSTRUCTION in "".join(item for item in call.content if isinstance(item, str))


def test_v12_failed_restarts_from_the_input(image):
    run = run_reflection(tint, image, INSTRUCTION, Thinker(judge([FAIL, SUCCEED])))
    assert [r.prompt for r in run.rounds] == [INSTRUCTION, INSTRUCTION]
    assert [r.from_input for r in run.rounds] == [True, True]
    assert all(same(output, tint(image, INSTRUCTION)) for output in run.images)


def test_v12_a_malformed_verdict_restarts_like_failed(image):
    """Two <#Think> pass the reflection validator but not format_text: treated as Failed."""
    doubled = "<#Think><#Think> hmm <#Reflection> make it blue"
    run = run_reflection(tint, image, INSTRUCTION, Thinker(judge([doubled, SUCCEED])))
    assert [r.from_input for r in run.rounds] == [True, True]
    assert run.rounds[0].refine is None and not run.rounds[0].success


@pytest.mark.parametrize("verdict", [SUCCEED, OTHERS])
def test_v12_success_and_others_stop_the_loop(image, verdict):
    run = run_reflection(tint, image, INSTRUCTION, Thinker(judge([verdict, FAIL])))
    assert len(run.rounds) == 1 and run.rounds[0].success and run.chosen == 0


@pytest.mark.parametrize("rounds", [1, 2, 4])
def test_v12_the_number_of_rounds_is_a_setting(image, rounds):
    chat = judge([FAIL])
    run = run_reflection(tint, image, INSTRUCTION, Thinker(chat), rounds=rounds)
    assert len(run.rounds) == rounds
    assert sum(call.stage == "reflection" for call in chat.calls) == rounds  # the last round is judged too


def test_v12_default_is_three_rounds(image):
    assert len(run_reflection(tint, image, INSTRUCTION, Thinker(judge([FAIL]))).rounds) == 3


def test_v12_zero_rounds_is_refused(image):
    with pytest.raises(ValueError, match="at least 1 round"):
        run_reflection(tint, image, INSTRUCTION, Thinker(judge([FAIL])), rounds=0)


def test_v12_thinking_rewrites_the_instruction_for_every_round_and_the_judge(image):
    chat = judge([FAIL, SUCCEED], reformat=["Put a red hat on the cat."])
    run = run_reflection(tint, image, INSTRUCTION, Thinker(chat), think=True)
    assert run.prompt == "Put a red hat on the cat." and run.rewrite.answer == "Put a red hat on the cat."
    assert [r.prompt for r in run.rounds] == [run.prompt, run.prompt]  # Failed restarts with the rewrite
    judged = [c for c in chat.calls if c.stage == "reflection"]
    assert all("Put a red hat on the cat." in c.content[-1] and INSTRUCTION not in c.content[-1] for c in judged)


def test_v12_best_round_prefers_the_higher_score_over_a_later_success(image):
    pairs = (([7, 8], [8, 9]), ([3, 9], [9, 9]), ([8, 7], [7, 9]))  # 56, 27, 49
    run = run_reflection(tint, image, INSTRUCTION, Thinker(judge([REFLECT, FAIL, SUCCEED], pairs)))
    assert [r.score for r in run.rounds] == [56, 27, 49]
    assert run.chosen == 0 and run.best_image is run.images[0]


@pytest.mark.parametrize(("scores_", "reflections", "chosen"), [
    ([6, 6, 6], [FAIL, FAIL, FAIL], 2),          # ties go to the later round
    ([6, 6, 6], [FAIL, SUCCEED, FAIL], 1),       # ... unless only the earlier one says <#Success>
    ([6, 6, 6], [SUCCEED, FAIL, SUCCEED], 2),    # both successes: the later one
    ([6, 6], [FAIL, OTHERS], 1),                 # <#Others> is no success here: a plain tie
    ([6, 6], [SUCCEED, OTHERS], 0),
    ([2, 9, 4], [FAIL, FAIL, SUCCEED], 1),
    ([-5, -3], [FAIL, FAIL], 0),                 # the scan starts at -1: nothing beats it, round 0 stays
    ([float("nan"), 1], [FAIL, FAIL], 1),
    ([None, 3, None], [FAIL, FAIL, FAIL], 1),    # unrankable rounds are left out
    ([None, None], [FAIL, SUCCEED], 1),          # nothing rankable: the last round
])
def test_v12_best_round_rule(scores_, reflections, chosen):
    assert best_round(scores_, reflections) == chosen


def test_v12_unrankable_scores_are_a_recorded_failure_not_a_crash(image):
    """The reference's min([]) raises at the end of the run; here the round is left out and noted."""
    pairs = (([], [8, 9]), ([4, 5], [5, 5]))
    run = run_reflection(tint, image, INSTRUCTION, Thinker(judge([FAIL, FAIL], pairs)), rounds=2)
    assert [r.score for r in run.rounds] == [None, 20]
    assert run.chosen == 1
    assert len(run.notes) == 1 and "round 1" in run.notes[0] and "cannot be ranked" in run.notes[0]


def test_v12_preview_prompts_have_no_scores_and_pick_the_last_round(image):
    chat = ScriptedChat({"describe": ["一只戴红帽子的猫。"], "consistency": [CONSISTENCY],
                         "reflection": [FAIL, SUCCEED]})
    run = run_reflection(tint, image, INSTRUCTION, Thinker(chat, prompts="preview"))
    assert run.scores == [None, None] and run.chosen == 1
    assert {call.stage for call in chat.calls} == {"describe", "consistency", "reflection"}


def test_v12_the_log_tells_the_story(image):
    pairs = (([7, 8], [8, 9]), ([8, 7], [7, 9]))
    run = run_reflection(tint, image, INSTRUCTION, Thinker(judge([REFLECT, SUCCEED], pairs)), think=True)
    log = format_run(run)
    for expected in ("Instruction: 'add a red hat to the cat'", "Rewritten by thinking: 'Put a red hat on the cat.'",
                     "Round 1: edit of the input image", "Round 2: edit of the previous output with ' Make the hat",
                     "consistency: 5.0 (raw 6.0; cap<=5", REFLECT, "scores: edit [7, 8], image [8, 9] -> rank 56",
                     "Reflection: the next round edits this output", "Success: the edit is accepted; stop",
                     "Chosen: round 1 of 2 (rank 56)"):
        assert expected in log, expected


def test_v12_an_error_answer_to_thinking_keeps_the_instruction(image):
    """The reference raises on a rewrite starting with "错误:"; here the instruction is kept and noted."""
    run = run_reflection(tint, image, INSTRUCTION, Thinker(judge([SUCCEED], reformat=["错误: timeout"])), think=True)
    assert run.prompt == INSTRUCTION and run.rounds[0].prompt == INSTRUCTION
    assert run.rewrite.failure and run.notes == [f"thinking: {run.rewrite.failure}"]


def test_v12_invalid_answers_are_retried_and_recorded(image):
    chat = ScriptedChat({"describe": ["错误: busy", "A cat in a red hat."], "consistency": ["no json", CONSISTENCY],
                         "reflection": ["<#Think> looks fine", SUCCEED], **scores((["8", 9], [1, 1]))})
    verdict = Thinker(chat).reflect(image, tint(image, INSTRUCTION), INSTRUCTION)
    assert verdict.description == "A cat in a red hat." and verdict.reflection == SUCCEED
    assert [stage for stage, _ in verdict.rejected] == ["describe", "consistency", "reflection"]
    assert verdict.calls == 8 and verdict.fallbacks == []


def test_v12_model_errors_are_not_retried(image):
    """The reference retries whatever the model call raises (even an interrupt); here it propagates."""
    class Broken(ScriptedChat):
        def chat(self, system, content, *, stage=""):
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        Thinker(Broken({"describe": ["x"]})).reflect(image, image, INSTRUCTION)


def test_v12_the_edit_must_return_an_image(image):
    with pytest.raises(TypeError, match="PIL image"):
        run_reflection(lambda img, text: None, image, INSTRUCTION, Thinker(judge([SUCCEED])))


# --------------------------------------------------------------------------------------------------------
# The golden reflect-loop sets: the same decisions as the reference, with the stand-in edit
# --------------------------------------------------------------------------------------------------------

def _loop_cases() -> list:
    return [pytest.param(path, id=path.stem) for path in LOOP_FILES] or [pytest.param(None, id="no-golden-set")]


@pytest.mark.parametrize("path", _loop_cases())
def test_v12_reflect_loop_decisions_match_the_reference(path: Path | None):
    if path is None:
        pytest.skip(f"no *_reflect_loop.safetensors in {GOLDEN_DIR} (set STEP1X_GOLDEN_V12_DIR)")
    with safe_open(str(path), "pt") as handle:
        about = json.loads(handle.metadata()["about"])
    source = Image.new("RGB", (96, 64), (120, 160, 200))  # the stand-in edit does not care which image
    chat = ScriptedChat(about["scripted_answers"])
    seen = []

    def edit(img: Image.Image, text: str) -> Image.Image:
        seen.append((img, text))
        return tint(img, text)

    tries = about["tries"]
    run = run_reflection(edit, source, "the user's instruction", Thinker(chat), rounds=len(tries), think=True)

    assert run.prompt == about["reformat_prompt"]
    assert [text for _, text in seen] == [t["prompt"] for t in tries]
    # The reference's try i edited the input image where its input's hash is the first try's.
    from_input = [t["input_image_png_sha256"] == tries[0]["input_image_png_sha256"] for t in tries]
    assert [img is source for img, _ in seen] == from_input
    assert run.reflections == about["think_info"]
    assert run.scores == about["best_info"]
    assert [run.chosen] == about["final_image_index"]
    assert [(c.stage, c.answer) for c in chat.calls] == [(c["stage"], c["stub_answer"].strip())
                                                          for c in about["thinker_calls"]]
