"""What the reflection loop did: each round's edit and verdict, and the round chosen (``report`` words it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .thinker import Rewrite, Verdict

__all__ = ["ReflectionRun", "Round"]


@dataclass
class Round:
    """One edit and its verdict. ``from_input``: whether it edited the input image (else the previous
    output); ``prompt``: the instruction it used; ``score``: its rank (None if the scores cannot rank it)."""

    index: int
    prompt: str
    from_input: bool
    output: Image.Image
    verdict: Verdict
    success: bool
    refine: str | None
    score: float | None


@dataclass
class ReflectionRun:
    """Everything the loop did. ``prompt``: the instruction every round was judged against (the rewrite
    when thinking was on); ``chosen``: the index of the best round; ``notes``: recorded failures."""

    instruction: str
    prompt: str
    rewrite: Rewrite | None
    rounds: list[Round]
    chosen: int
    notes: list[str] = field(default_factory=list)

    @property
    def images(self) -> list[Image.Image]:
        return [r.output for r in self.rounds]

    @property
    def best_image(self) -> Image.Image:
        return self.rounds[self.chosen].output

    @property
    def reflections(self) -> list[str]:
        return [r.verdict.reflection for r in self.rounds]

    @property
    def scores(self) -> list[dict[str, Any] | None]:
        return [r.verdict.scores for r in self.rounds]
