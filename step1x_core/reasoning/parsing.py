"""Reading the judge's answers exactly as the reference does, quirks included.

Each function reproduces one of the reference's (``pipeline_step1x_edit_thinker.py``), named in its
docstring; the golden table ``*_parsing.json`` checks them answer by answer. Where the reference's
behaviour is odd but harmless it is reproduced and marked QUIRK; where the reference crashes, the
function here reports a failure instead (marked CRASH) and gives the same results everywhere else.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .prompts import CONSTANTS

__all__ = ["FAILED", "OTHERS", "REFLECTION", "SUCCESS", "THINK", "VERDICT_TAGS", "apply_score_caps",
           "clean_reflection", "format_reflection", "parse_json_block", "round_score", "validate_score_answer",
           "verdict_is_well_formed"]

# "<#Think>", then the four verdict tags in the reference's order (its error message lists them).
THINK, REFLECTION, FAILED, SUCCESS, OTHERS = CONSTANTS["reflection_tags"]
VERDICT_TAGS = (REFLECTION, FAILED, SUCCESS, OTHERS)

_JSON_BLOCK = re.compile(r"\{.*\}", flags=re.S)


def verdict_is_well_formed(text: str) -> bool:
    """``validate_string``: starts with <#Think>, holds it once, and holds exactly one verdict tag in total
    (occurrences of all four counted together)."""
    if not text.startswith(THINK) or text.count(THINK) != 1:
        return False
    return sum(text.count(tag) for tag in VERDICT_TAGS) == 1


def format_reflection(text: str) -> tuple[bool, str | None]:
    """``Step1XEditThinker.format_text``: (success, refined instruction) of a cleaned reflection.

    - Success for <#Success> and also for <#Others>.
    - <#Reflection>: the text after the tag as the next instruction.
      QUIRK: it is not stripped (" Make it red." keeps its leading space; a trailing fence survives),
      and an empty string is still an instruction.
    - <#Failed>, or anything not well formed (QUIRK: two <#Think> tags, or a preamble before <#Think>,
      which the reflection validator itself accepts): (False, None), i.e. restart from the input.
    """
    if not verdict_is_well_formed(text):
        return False, None
    if REFLECTION in text:
        return False, text.split(REFLECTION)[1]
    if SUCCESS in text or OTHERS in text:
        return True, None
    return False, None


def clean_reflection(text: str) -> tuple[bool, str]:
    """``_validate_reflection_response``: (valid, cleaned text or the reference's error message).

    Valid: <#Think> present; exactly one kind of verdict tag present, once; it first occurs after the
    first <#Think>. Cleaned: from the first <#Think> to the end, stripped.
    QUIRK: tags are case-sensitive, a second <#Think> is allowed here (format_reflection then rejects it),
    and a preamble before <#Think> is cut off here but not in format_text's own check.
    """
    think_at = text.find(THINK)
    if think_at < 0:
        return False, f"错误: 缺少 {THINK}"
    present = [tag for tag in VERDICT_TAGS if tag in text]
    if len(present) != 1:
        return False, f"错误: 需要且仅需要 {list(VERDICT_TAGS)} 之一, 但找到了 {len(present)} 个。"
    tag = present[0]
    if text.count(tag) > 1:
        return False, f"错误: 标签 {tag} 出现次数 > 1"
    if text.find(tag) < think_at:
        return False, f"错误: 反思/失败/成功标签必须出现在 {THINK} 之后"
    return True, text[think_at:].strip()


def parse_json_block(text: str) -> Any:
    """``_parse_json_block``: the JSON of the text from its first "{" to its last "}", or None.

    QUIRK: greedy, so two objects in one answer ("{...} and {...}") fail to parse, while prose or a code
    fence around one object is fine.
    """
    match = _JSON_BLOCK.search(text)
    if match is None:
        return None
    try:
        return json.loads(match.group(0))
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; absurd nesting recurses
        return None


def apply_score_caps(obj: dict[str, Any]) -> dict[str, Any] | None:
    """``_apply_score_caps_and_finalize``: the consistency score, capped by the judge's own counts; None
    when a field cannot be read (the stage is then retried).

    QUIRKS kept: missing or null counts are 0; counts are truncated to int (1.7 -> 1) while a string like
    "1.5" fails; a raw score within [0, 1.0000001] is taken as a 0..1 scale and multiplied by 10 (so 1
    means 10); "hallucinations" is still read though the English prompt no longer asks for it; the cap
    trace is in Chinese; the score is rounded to 4 decimals through a string.
    """
    try:
        meets = str(obj.get("meets_instruction", "")).strip().lower()
        major = int(obj.get("major_conflicts", 0) or 0)
        minor = int(obj.get("minor_conflicts", 0) or 0)
        hallucinations = int(obj.get("hallucinations", 0) or 0)
        omissions = int(obj.get("omissions", 0) or 0)
        raw = float(obj.get("raw_score", 0))
        reason = str(obj.get("reason", "")).strip()
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None
    if 0 <= raw <= 1.0000001:
        raw *= 10.0
    raw = max(0.0, min(10.0, raw))  # this argument order: a NaN raw score becomes 10, as in the reference
    cap, trace = 10.0, []
    if meets == "no":
        cap = min(cap, 2.0)
        trace.append("cap<=2: 未满足指令关键要求")
    elif meets == "partial":
        cap = min(cap, 5.0)
        trace.append("cap<=5: 仅部分满足指令")
    if major >= 2:
        cap = min(cap, 5.0)
        trace.append("cap<=5: 多个明显矛盾")
    elif major == 1:
        cap = min(cap, 8.0)
        trace.append("cap<=8: 存在1个明显矛盾")
    if hallucinations > 0 or omissions > 0:
        cap = min(cap, 7.0)
        why = ([f"幻觉x{hallucinations}"] if hallucinations > 0 else []) + (
            [f"遗漏x{omissions}"] if omissions > 0 else [])
        trace.append(f"cap<=7: {', '.join(why)}")
    if meets != "yes" or major > 0 or hallucinations > 0 or omissions > 0:
        cap = min(cap, 8.99)
        trace.append("cap<9: 存在明显差异/问题")
    return {"score": float(f"{min(raw, cap):.4f}"), "raw_score": raw, "cap_trace": trace,
            "meets_instruction": meets, "major_conflicts": major, "minor_conflicts": minor,
            "hallucinations": hallucinations, "omissions": omissions, "reason": reason}


def validate_score_answer(text: str) -> tuple[bool, Any]:
    """``_validate_score1_response`` (used for score1 and score2): (True, the parsed dict) when the
    answer is a JSON object with "score" (a list) and "reasoning"; else (False, the answer).

    QUIRKS kept: a leading "```json" or "```" fence is removed by cutting 7 or 3 characters at the start and
    always 3 at the end (fence or not); the whole rest must be JSON, so any prose fails; the list is not
    checked, so "score": [] or ["high"] is accepted (see ``round_score``).
    """
    content = text.strip()
    if content.startswith("```json"):
        content = content[7:-3].strip()
    elif content.startswith("```"):
        content = content[3:-3].strip()
    try:
        parsed = json.loads(content)
    except (ValueError, RecursionError):
        return False, text
    if isinstance(parsed, dict) and "score" in parsed and "reasoning" in parsed and isinstance(parsed["score"], list):
        return True, parsed
    return False, text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))  # bool included: Python's min() and * take it as 0/1


def round_score(scores: dict[str, Any]) -> float | None:
    """The number a round is ranked by: min(score1's list) * min(score2's list).

    CRASH: the reference's ``min()`` or product raises on an empty list or on anything but numbers,
    ending the whole edit with an error. Here such a round gets None (it cannot be ranked) and the
    failure is reported by the caller.
    """
    lists = [scores["score1"].get("score"), scores["score2"].get("score")]
    if not all(isinstance(values, list) and values and all(map(_is_number, values)) for values in lists):
        return None
    return min(lists[0]) * min(lists[1])
