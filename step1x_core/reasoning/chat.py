"""Who answers the thinker: any model that turns a system prompt and a list of images and texts into text.

The thinker and the reflection loop only talk to this interface, so the fine-tuned Qwen2.5-VL
(``QwenChat``), a scripted model in tests (``ScriptedChat``) or any other MLLM can answer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .prompts import ChatItem

__all__ = ["ChatModel", "RecordedCall", "ScriptedChat"]


class ChatModel(ABC):
    """An MLLM that answers one request at a time."""

    @abstractmethod
    def chat(self, system: str, content: Sequence[ChatItem], *, stage: str = "") -> str:
        """The model's answer (stripped) to ``system`` + one user message holding ``content`` in order.

        ``stage`` names the thinker stage asking ("reformat", "describe", "consistency", "reflection",
        "score1", "score2"); a model may ignore it.
        """


@dataclass(frozen=True)
class RecordedCall:
    stage: str
    system: str
    content: tuple[ChatItem, ...]
    answer: str


class ScriptedChat(ChatModel):
    """Answers from a script: ``answers[stage]`` is the list of answers for that stage's 1st, 2nd, ...
    call; past its end the last answer repeats. Every call is recorded in ``calls``.

    This is the shape of the golden sets' ``scripted_answers``; tests and demos use it where the real
    model's answers (random for tiny weights) cannot exercise the loop.
    """

    def __init__(self, answers: Mapping[str, Sequence[str]]):
        empty = sorted(stage for stage, script in answers.items() if not script)
        if empty:
            raise ValueError(f"the script has no answer for stage(s) {', '.join(empty)}")
        self.answers = {stage: list(script) for stage, script in answers.items()}
        self.calls: list[RecordedCall] = []

    def chat(self, system: str, content: Sequence[ChatItem], *, stage: str = "") -> str:
        script = self.answers.get(stage)
        if script is None:
            raise KeyError(f"the script has no answers for stage {stage!r} (it has {', '.join(self.answers)})")
        occurrence = sum(call.stage == stage for call in self.calls)
        answer = script[min(occurrence, len(script) - 1)].strip()
        self.calls.append(RecordedCall(stage, system, tuple(content), answer))
        return answer
