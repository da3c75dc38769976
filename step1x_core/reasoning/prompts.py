"""The thinker's prompts: the packaged prompt files, their placeholders, and the requests built from them.

Each stage of thinking and reflection is one request to the MLLM: a system prompt and a user content
list of images and texts, in the order the reference sends them. The texts are files in ``assets/``
(byte-identical to the reference's strings); values are inserted in one pass over the placeholders,
never with ``str.format`` (the prompts contain literal JSON braces).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from PIL import Image

__all__ = ["ASSETS", "CHAT_TEMPLATE", "CONSTANTS", "PLACEHOLDERS", "PROMPT_SETS", "ChatItem", "ChatRequest",
           "PromptSet", "analyze_text", "fill", "read_asset"]

# Found from this file, never by the package's name: inside ComfyUI the engine is `<pack>.step1x_core`.
ASSETS = Path(__file__).resolve().parent / "assets"

PLACEHOLDERS = ("INSTRUCTION", "LANGUAGE", "DESCRIPTION", "PRIOR_SCORE", "PRIOR_REASON")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
_CJK = re.compile(r"[\u4e00-\u9fff]")

ChatItem = Union[Image.Image, str]  # one entry of a user message: an image or a text


def read_asset(name: str) -> str:
    """A packaged prompt file, exactly as stored (UTF-8, no newline added or removed)."""
    with open(ASSETS / name, encoding="utf-8", newline="") as handle:  # newline="": keep \r\n if any
        return handle.read()


CONSTANTS: dict[str, Any] = json.loads(read_asset("thinker_constants.json"))
CHAT_TEMPLATE: str = read_asset("qwen25vl_chat_template.jinja")


def fill(template: str, **values: str) -> str:
    """``template`` with every ``{NAME}`` placeholder replaced by ``values[NAME]``, in a single pass.

    A single pass means inserted text is never scanned again: an instruction that itself contains
    "{DESCRIPTION}" stays literal. Values the template does not use are ignored; a placeholder without
    a value is an error.
    """
    missing = sorted({name for name in _PLACEHOLDER.findall(template) if name not in values})
    if missing:
        raise KeyError(f"no value for the prompt placeholder(s) {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def analyze_text(text: str) -> str:
    """The language word the prompts embed: "中文" when ``text`` holds more than one CJK ideograph
    (U+4E00..U+9FFF), else "英文" (the reference inserts these Chinese words even into English prompts)."""
    words = CONSTANTS["language_type_values"]
    return words["chinese"] if len(_CJK.findall(text)) > 1 else words["english"]


Stage = Literal["reformat", "describe", "consistency", "reflection", "score1", "score2"]


@dataclass(frozen=True)
class ChatRequest:
    """One call to the MLLM: which stage asks, the system prompt, and the user content in order."""

    stage: str
    system: str
    content: tuple[ChatItem, ...]


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one evaluator: files ``<prefix>_<stage>_{system,user}.txt``.

    ``scores``: whether it has the two VIEScore-style stages (score1, score2); only the final v1.2
    thinker does.
    """

    name: str
    prefix: str
    scores: bool

    def _texts(self, stage: str, values: dict[str, str]) -> tuple[str, str]:
        system = fill(read_asset(f"{self.prefix}_{stage}_system.txt"), **values)
        return system, fill(read_asset(f"{self.prefix}_{stage}_user.txt"), **values)

    def reformat(self, image: Image.Image, instruction: str) -> ChatRequest:
        """Thinking: rewrite ``instruction`` for ``image``. Content: [image, text]."""
        system, user = self._texts("reformat", {"INSTRUCTION": instruction, "LANGUAGE": analyze_text(instruction)})
        return ChatRequest("reformat", system, (image, user))

    def describe(self, source: Image.Image, instruction: str) -> ChatRequest:
        """Reflection a: describe the image the edit should give. Content: [source, text]."""
        system, user = self._texts("describe", {"INSTRUCTION": instruction, "LANGUAGE": analyze_text(instruction)})
        return ChatRequest("describe", system, (source, user))

    def consistency(self, edited: Image.Image, instruction: str, description: str) -> ChatRequest:
        """Reflection b: score the edited image against the description. Content: [text, edited] (text first)."""
        values = {"INSTRUCTION": instruction, "LANGUAGE": analyze_text(instruction), "DESCRIPTION": description}
        system, user = self._texts("consistency", values)
        return ChatRequest("consistency", system, (user, edited))

    def reflection(self, source: Image.Image, edited: Image.Image, instruction: str, evaluation: dict[str, Any]
                   ) -> ChatRequest:
        """Reflection c: the verdict, given the consistency result as a prior. Content: [source, edited, text].

        The prior is the capped score as Python writes a float (``7.0``, ``8.99``) and the reason.
        """
        values = {"INSTRUCTION": instruction, "PRIOR_SCORE": str(evaluation["score"]),
                  "PRIOR_REASON": str(evaluation["reason"])}
        system, user = self._texts("reflection", values)
        return ChatRequest("reflection", system, (source, edited, user))

    def score1(self, source: Image.Image, edited: Image.Image, instruction: str) -> ChatRequest:
        """Editing success and over-editing, 0..10 each. Content: [source, edited, text]."""
        system, user = self._texts("score1", {"INSTRUCTION": instruction})
        return ChatRequest("score1", system, (source, edited, user))

    def score2(self, edited: Image.Image) -> ChatRequest:
        """Naturalness and artifacts of the edited image, 0..10 each; the instruction is not shown."""
        system, user = self._texts("score2", {})
        return ChatRequest("score2", system, (edited, user))


PROMPT_SETS = {
    # ImageEditEvaluator_EN: the final Step1X-Edit v1.2 thinker.
    "v1.2": PromptSet("v1.2", "thinker", scores=True),
    # ImageEditEvaluator: the Chinese evaluator of Step1X-Edit-v1p2-preview (no score stages).
    "preview": PromptSet("preview", "preview_cn", scores=False),
}
