"""Thinking (rewrite the instruction) and judging one edit, as Step1X-Edit v1.2's thinker does.

``Thinker.think`` asks the MLLM once to rewrite the instruction for the image. ``Thinker.reflect`` judges
an edit in stages, each retried on an invalid answer up to ``max_tries`` (20) times:

1. describe: the image the edit should give, in words;
2. consistency: the edited image against that description, as JSON, capped (``apply_score_caps``);
3. reflection: the verdict, ``<#Think> ... <#Success>`` / ``<#Failed>`` / ``<#Reflection> new instruction``;
   if any of 1-3 never gives a valid answer, the verdict is the reference's fallback (a <#Failed>);
4. score1 and score2 (final v1.2 prompts only): two 0..10 pairs that rank the rounds; each falls back
   to [0, 0].

Deliberate difference: the reference also retries when the model call itself raises (out of memory, an
interrupt); here only invalid answers are retried and errors propagate.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .chat import ChatModel
from .parsing import apply_score_caps, clean_reflection, format_reflection, parse_json_block, validate_score_answer
from .prompts import CONSTANTS, PROMPT_SETS, ChatRequest, PromptSet

__all__ = ["MAX_TRIES", "Rewrite", "Thinker", "Verdict"]

MAX_TRIES = 20
ERROR_PREFIX = CONSTANTS["api_error_prefix_checked"]  # "错误:", what the reference's API client answered on errors
REFLECTION_FALLBACK = CONSTANTS["reflection_failure_fallback"]

Reader = Callable[[str], tuple[bool, Any]]  # answer -> (valid, value or why it is not)


@dataclass
class Rewrite:
    """The outcome of thinking: ``instruction`` is what the edit uses, ``answer`` what the model said.

    ``failure``: set when the answer could not be used and the original instruction was kept.
    """

    instruction: str
    answer: str
    failure: str | None = None


@dataclass
class Verdict:
    """The judge's view of one edit.

    ``reflection``: the cleaned verdict text (the reference's ``think_info`` entry), or the fallback.
    ``scores``: ``{"score1": {...}, "score2": {...}}`` (the reference's ``best_info``), None for the preview
    prompts, which have no score stages. ``description``/``evaluation``: stages 1 and 2 (None if they
    failed). ``rejected``: (stage, why) for every invalid answer; ``fallbacks``: stages that never gave a
    valid one; ``calls``: model calls made.
    """

    reflection: str
    scores: dict[str, dict[str, Any]] | None = None
    description: str | None = None
    evaluation: dict[str, Any] | None = None
    rejected: list[tuple[str, str]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    calls: int = 0

    @property
    def decision(self) -> tuple[bool, str | None]:
        """(success, instruction for the next round) as the loop reads the reflection."""
        return format_reflection(self.reflection)


def _read_description(answer: str) -> tuple[bool, Any]:
    if answer.startswith(ERROR_PREFIX):
        return False, f"the answer starts with {ERROR_PREFIX!r}"
    return True, answer.strip()


def _read_consistency(answer: str) -> tuple[bool, Any]:
    if answer.startswith(ERROR_PREFIX):
        return False, f"the answer starts with {ERROR_PREFIX!r}"
    block = parse_json_block(answer)
    if block is None:
        return False, f"no JSON object in {answer[:200]!r}"
    evaluation = apply_score_caps(block) if isinstance(block, dict) else None
    if evaluation is None:
        return False, f"unreadable fields in {block!r}"
    return True, evaluation


def _read_scores(answer: str) -> tuple[bool, Any]:
    valid, value = validate_score_answer(answer)
    return (True, value) if valid else (False, f"not a JSON object with a score list and reasoning: {answer[:200]!r}")


def _check_image(image: Any, role: str) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"thinking and reflection need the {role} as a PIL image, got {type(image).__name__} "
                        "(text-to-image has no input image: run it with thinking and reflection off)")


class Thinker:
    """Step1X-Edit v1.2's thinker over any ``ChatModel``.

    ``prompts``: "v1.2" (the final English prompts, with the two score stages) or "preview" (the
    Chinese prompts of Step1X-Edit-v1p2-preview; no scores). The preview retried forever; here it stops
    after ``max_tries`` like the final one.
    """

    def __init__(self, chat: ChatModel, *, prompts: str = "v1.2", max_tries: int = MAX_TRIES):
        if prompts not in PROMPT_SETS:
            raise ValueError(f"unknown thinker prompts {prompts!r}; choose one of {', '.join(PROMPT_SETS)}")
        if max_tries < 1:
            raise ValueError(f"max_tries must be at least 1, got {max_tries}")
        self.chat = chat
        self.prompts: PromptSet = PROMPT_SETS[prompts]
        self.max_tries = max_tries

    def _call(self, request: ChatRequest) -> str:
        return self.chat.chat(request.system, request.content, stage=request.stage)

    def think(self, image: Image.Image, instruction: str) -> Rewrite:
        """The instruction rewritten for ``image`` (one call, used verbatim, even when empty).

        CRASH in the reference: an answer starting with "错误:" raises there; here the original
        instruction is kept and the failure recorded.
        """
        _check_image(image, "input image")
        answer = self._call(self.prompts.reformat(image, instruction))
        if answer.startswith(ERROR_PREFIX):
            return Rewrite(instruction, answer, f"the rewrite starts with {ERROR_PREFIX!r}; kept the instruction")
        return Rewrite(answer.strip(), answer)

    def _ask(self, request: ChatRequest, read: Reader, verdict: Verdict) -> Any:
        """The first valid answer's value, or None after ``max_tries`` invalid ones."""
        for _ in range(self.max_tries):
            answer = self._call(request)
            verdict.calls += 1
            valid, value = read(answer)
            if valid:
                return value
            verdict.rejected.append((request.stage, value))
        verdict.fallbacks.append(request.stage)
        return None

    def reflect(self, source: Image.Image, edited: Image.Image, instruction: str) -> Verdict:
        """Judge ``edited`` (made from ``source``) against ``instruction``."""
        _check_image(source, "input image")
        _check_image(edited, "edited image")
        verdict = Verdict(REFLECTION_FALLBACK)
        prompts = self.prompts
        verdict.description = self._ask(prompts.describe(source, instruction), _read_description, verdict)
        if verdict.description is not None:
            request = prompts.consistency(edited, instruction, verdict.description)
            verdict.evaluation = self._ask(request, _read_consistency, verdict)
        if verdict.evaluation is not None:
            request = prompts.reflection(source, edited, instruction, verdict.evaluation)
            reflection = self._ask(request, clean_reflection, verdict)
            if reflection is not None:
                verdict.reflection = reflection
        if prompts.scores:
            score1 = self._ask(prompts.score1(source, edited, instruction), _read_scores, verdict)
            score2 = self._ask(prompts.score2(edited), _read_scores, verdict)
            verdict.scores = {
                "score1": score1 if score1 is not None else copy.deepcopy(CONSTANTS["score1_failure_fallback"]),
                "score2": score2 if score2 is not None else copy.deepcopy(CONSTANTS["score2_failure_fallback"]),
            }
        return verdict
