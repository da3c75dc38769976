"""The reflection loop's account for people: what was asked, what the judge saw and said, what was chosen."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .parsing import FAILED, OTHERS, REFLECTION, SUCCESS
from .record import ReflectionRun, Round
from .thinker import Verdict

__all__ = ["format_run"]


def _score_list(scores: dict[str, Any] | None, key: str) -> str:
    return repr(scores[key].get("score")) if scores is not None else "-"


def _verdict_word(reflection: str) -> str:
    found = [tag for tag in (SUCCESS, OTHERS, REFLECTION, FAILED) if tag in reflection]
    return found[0].strip("<#>") if len(found) == 1 else "malformed"


def _decision(round_: Round, last: bool) -> str:
    word = _verdict_word(round_.verdict.reflection)
    if round_.success:
        return f"{word}: the edit is accepted; stop"
    if last:
        return f"{word}: no rounds left"
    if round_.refine is not None:
        return f"{word}: the next round edits this output with {round_.refine!r}"
    return f"{word}: the next round starts again from the input image"


def _problems(verdict: Verdict) -> list[str]:
    lines = []
    for stage, count in Counter(stage for stage, _ in verdict.rejected).items():
        last_reason = [why for s, why in verdict.rejected if s == stage][-1]
        lines.append(f"  rejected {stage} answers: {count} (last: {last_reason})")
    if verdict.fallbacks:
        lines.append(f"  no valid answer, fell back for: {', '.join(verdict.fallbacks)}")
    return lines


def _round_lines(round_: Round, last: bool) -> list[str]:
    verdict = round_.verdict
    start = "the input image" if round_.from_input else "the previous output"
    lines = [f"Round {round_.index + 1}: edit of {start} with {round_.prompt!r}"]
    if verdict.description is not None:
        lines.append(f"  description: {verdict.description}")
    if verdict.evaluation is not None:
        evaluation = verdict.evaluation
        caps = "; ".join(evaluation["cap_trace"]) or "no caps"
        lines.append(f"  consistency: {evaluation['score']} (raw {evaluation['raw_score']}; {caps}): "
                     f"{evaluation['reason']}")
    lines.append(f"  verdict: {verdict.reflection}")
    if verdict.scores is not None:
        rank = "cannot be ranked" if round_.score is None else f"rank {round_.score}"
        lines.append(f"  scores: edit {_score_list(verdict.scores, 'score1')}, "
                     f"image {_score_list(verdict.scores, 'score2')} -> {rank}")
    lines += _problems(verdict)
    lines.append(f"  decision: {_decision(round_, last)}")
    return lines


def format_run(run: ReflectionRun) -> str:
    lines = [f"Instruction: {run.instruction!r}"]
    if run.rewrite is not None:
        lines.append(f"Rewritten by thinking: {run.prompt!r}")
    for round_ in run.rounds:
        lines += _round_lines(round_, last=round_ is run.rounds[-1])
    lines += [f"Note: {note}" for note in run.notes]
    chosen = run.rounds[run.chosen]
    why = f"rank {chosen.score}" if chosen.score is not None else "no round could be ranked: the last one"
    lines.append(f"Chosen: round {run.chosen + 1} of {len(run.rounds)} ({why})")
    return "\n".join(lines)
