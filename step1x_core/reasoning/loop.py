"""The reflection loop: edit, let the judge look, re-edit or restart, and pick the best round.

One round edits an image with an instruction and asks the thinker for a verdict on the result, always
against the *input* image and the (possibly rewritten) *original* instruction:

- <#Success> (or <#Others>): stop;
- <#Reflection> new instruction: the next round edits this round's output with the new instruction;
- <#Failed> or a malformed verdict: the next round starts again from the input image and instruction.

At most ``rounds`` edits, each judged, the last one too. The best round maximises
min(score1) * min(score2); on a tie a round whose verdict says <#Success> wins over one that does not,
otherwise the later round wins (the reference's rule). The edit itself is the caller's: any
``edit(image, instruction) -> image``; randomness across rounds (the generator) is the caller's too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image

from .parsing import SUCCESS, round_score
from .record import ReflectionRun, Round
from .thinker import Thinker

__all__ = ["DEFAULT_ROUNDS", "EditFn", "ReflectionRun", "Round", "best_round", "run_reflection"]

DEFAULT_ROUNDS = 3
EditFn = Callable[[Image.Image, str], Image.Image]


def best_round(scores: Sequence[float | None], reflections: Sequence[str]) -> int:
    """The reference's choice of the final image among the rounds.

    Scan in order from (best 0, score -1): a higher score wins; an equal score wins if its reflection says
    <#Success> and the best's does not, or if both say the same (ties go to the later round). <#Others>
    is not a success here, though it stops the loop. CRASH in the reference: an unrankable round (None)
    raises there; here it is skipped, and when no round can be ranked the last round is chosen (the one
    whose verdict ended the loop).
    """
    if all(score is None for score in scores):
        return len(scores) - 1
    best, best_score, best_success = 0, -1.0, False
    for index, (score, reflection) in enumerate(zip(scores, reflections)):
        if score is None:
            continue
        success = SUCCESS in reflection
        if score > best_score or (score == best_score and (success or not best_success)):
            best, best_score, best_success = index, score, success
    return best


def run_reflection(edit: EditFn, image: Image.Image, instruction: str, thinker: Thinker, *,
                   rounds: int = DEFAULT_ROUNDS, think: bool = False,
                   on_round: Callable[[Round], None] | None = None) -> ReflectionRun:
    """Edit ``image`` with ``instruction`` under the judge's eye, for at most ``rounds`` rounds.

    ``think``: rewrite the instruction first (``Thinker.think``); the rewrite then replaces it for every
    round and for the judge. ``on_round``: called after each round (progress, logging).
    """
    if rounds < 1:
        raise ValueError(f"the reflection loop needs at least 1 round, got {rounds}; without reflection, edit once")
    rewrite = thinker.think(image, instruction) if think else None
    prompt = rewrite.instruction if rewrite is not None else instruction
    done: list[Round] = []
    notes = [f"thinking: {rewrite.failure}"] if rewrite is not None and rewrite.failure else []
    source, current, from_input = image, prompt, True
    for index in range(rounds):
        output = edit(source, current)
        if not isinstance(output, Image.Image):
            raise TypeError(f"the edit function returned {type(output).__name__}; the loop needs a PIL image")
        verdict = thinker.reflect(image, output, prompt)
        success, refine = verdict.decision
        score = round_score(verdict.scores) if verdict.scores is not None else None
        if verdict.scores is not None and score is None:
            notes.append(f"round {index + 1}: its scores cannot be ranked (the reference would stop with an error: "
                         f"min() of {verdict.scores['score1'].get('score')!r} and "
                         f"{verdict.scores['score2'].get('score')!r}); it is left out of the choice")
        done.append(Round(index, current, from_input, output, verdict, success, refine, score))
        if on_round is not None:
            on_round(done[-1])
        if success:
            break
        if refine is not None:
            source, current, from_input = output, refine, False
        else:
            source, current, from_input = image, prompt, True
    chosen = best_round([r.score for r in done], [r.verdict.reflection for r in done])
    return ReflectionRun(instruction, prompt, rewrite, done, chosen, notes)
