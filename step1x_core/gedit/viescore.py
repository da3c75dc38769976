"""VIEScore for one edit, as GEdit-Bench runs it: two questions to a judge, two lists of scores, three
numbers.

- SC (semantic consistency): the source and the edited image, asked with context + two-image edit rule +
  SC rule (the instruction filled in); the judge answers scores [editing success, overediting].
- PQ (perceptual quality): the edited image alone, asked with context + PQ rule; the judge answers
  [naturalness, artifacts].
- SC and PQ are the minimum of their lists; O = sqrt(SC * PQ).

The edited image is compared at the source image's size (converted to RGB and resized to it). Reading
an answer follows the official rules (``parse_scores``). Where the official code, after one failed
re-ask, substitutes a random guess, this records a parse failure with the judge's answers instead, so
a score is never made up and a run can be repeated exactly.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from PIL import Image

from .viescore_prompts import CONTEXT, INSTRUCTION_SLOT, RULE_PQ, TIE_RULE_SC, TWO_IMAGE_EDIT_RULE

__all__ = ["DELIMITER", "Judge", "VieScore", "parse_scores", "pq_prompt", "score_edit", "sc_prompt"]

DELIMITER = "||V^=^V||"
ASKS = 2  # the official code asks again once when an answer cannot be read
_TWO_SCORES = re.compile(r"^\[\d+, ?\d+\]$")
_BARE_KEY = re.compile(r"(\w+):")
_PAIR = re.compile(r'(".*?"):(.*?)(,|})')
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
_LITERAL = re.compile(r"^(true|false|null)$", re.IGNORECASE)


class Judge(Protocol):
    """A multimodal model that answers a prompt about some images."""

    name: str  # names the judge in the scores folder and records

    def ask(self, images: list[Image.Image], prompt: str) -> str: ...


def sc_prompt(instruction: str) -> str:
    return "\n".join([CONTEXT, TWO_IMAGE_EDIT_RULE, TIE_RULE_SC]).replace(INSTRUCTION_SLOT, instruction)


def pq_prompt() -> str:
    return "\n".join([CONTEXT, RULE_PQ])


def _repair(text: str) -> str:
    """The official last resort for almost-JSON: quote bare keys, wrap a bare number in a list, quote
    other bare values."""
    def value(match: re.Match) -> str:
        key, raw, end = match.groups()
        raw = raw.strip()
        if _NUMBER.match(raw):
            raw = f"[{raw}]"
        elif not _LITERAL.match(raw):
            raw = f'"{raw}"'
        return f"{key}: {raw}{end}"

    return _PAIR.sub(value, _BARE_KEY.sub(r'"\1":', text))


def _payload(answer: str) -> Any:
    """The JSON the answer carries, found the official way; None when there is none."""
    if answer.count(DELIMITER) == 2:
        text = answer[answer.find(DELIMITER) + len(DELIMITER):answer.rfind(DELIMITER)]
    elif "{" in answer and "}" in answer:
        text = answer[answer.find("{"):answer.rfind("}") + 1]
    else:
        bracketed = answer[answer.find("["):answer.rfind("]") + 1] if "[" in answer else ""
        if _TWO_SCORES.match(bracketed):  # a bare list of two scores, e.g. [6, 0]
            return {"score": json.loads(bracketed)}
        try:
            number = int(answer)  # a bare score
        except ValueError:
            return None
        return {"score": [number]} if 0 <= number <= 10 else None
    text = text.strip().replace("\n", "")
    for candidate in (text, _repair(text)):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    return None


def parse_scores(answer: str) -> list[float] | None:
    """The judge's score list, or None when the answer holds none."""
    payload = _payload(answer)
    if not isinstance(payload, dict) or "score" not in payload:
        return None
    scores = payload["score"] if isinstance(payload["score"], list) else [payload["score"]]
    if not scores or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                             for s in scores):
        return None
    return scores


@dataclass
class VieScore:
    """The judge's verdict on one edit (``status`` "ok", or "parse_failure" with no numbers)."""

    status: str
    sc_scores: list[float] | None = None
    pq_scores: list[float] | None = None
    SC: float | None = None
    PQ: float | None = None
    O: float | None = None  # noqa: E741 - the paper's name
    answers: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ask_until_read(judge: Judge, images: list[Image.Image], prompt: str, answers: list[str]) -> list[float] | None:
    for _ in range(ASKS):
        answer = judge.ask(images, prompt)
        answers.append(answer)
        scores = parse_scores(answer)
        if scores is not None:
            return scores
    return None


def score_edit(judge: Judge, source: Image.Image, edited: Image.Image, instruction: str) -> VieScore:
    """Ask the judge about one edit (source = the ``_SRCIMG`` image) and combine its answers."""
    edited = edited.convert("RGB").resize(source.size)
    answers: dict[str, list[str]] = {"SC": [], "PQ": []}
    sc = _ask_until_read(judge, [source, edited], sc_prompt(instruction), answers["SC"])
    pq = _ask_until_read(judge, [edited], pq_prompt(), answers["PQ"])
    if sc is None or pq is None:
        return VieScore("parse_failure", sc, pq, answers=answers)
    low_sc, low_pq = min(sc), min(pq)
    if low_sc < 0 or low_pq < 0:  # no square root of a negative product; scores run from 0 to 10
        return VieScore("parse_failure", sc, pq, answers=answers)
    return VieScore("ok", sc, pq, low_sc, low_pq, math.sqrt(low_sc * low_pq), answers)
