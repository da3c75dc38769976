"""v1.2's thinking and reflection around its edit: the MLLM rewrites the instruction first, judges each
edit and asks for a re-edit or a restart (``reasoning``), with every edit drawn from one CPU generator."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image
from torch import Tensor

from ..reasoning.chat import ChatModel
from ..reasoning.loop import run_reflection
from ..reasoning.record import ReflectionRun
from ..reasoning.qwen_chat import QwenChat
from ..reasoning.thinker import Rewrite, Thinker
from ..sampling.diffusers import cpu_generator
from ..sampling.loop import StepCallback
from .models import Models
from .settings import EditSettings
from .v12_edit import edit_v12


@dataclass
class ReasonedEdit:
    """A v1.2 edit with thinking and/or reflection: the chosen picture, the instruction the edits used
    (rewritten when thinking was on), and the reflection loop's record (None without reflection)."""

    image: Image.Image
    instruction: str
    run: ReflectionRun | None
    rewrite: Rewrite | None
    latents: list[Tensor]  # each edit's final packed target tokens, in order


class ChatOnDevice(ChatModel):
    """A chat whose text encoder visits the compute device for each call (offloading)."""

    def __init__(self, models: Models, chat: ChatModel):
        self.models, self.inner = models, chat

    def chat(self, system, content, *, stage: str = "") -> str:
        with self.models.on_device(self.models.embedder):
            return self.inner.chat(system, content, stage=stage)


def v12_editor(models: Models, settings: EditSettings, callback: StepCallback | None = None):
    """``edit(source, instruction) -> (picture, final tokens)`` for the reflection loop: every round's edit
    draws from one CPU generator seeded with ``settings.seed`` (the reference's single generator), so round
    n's noise follows round n-1's draws."""
    generator = cpu_generator(settings.seed)

    def edit(source: Image.Image, instruction: str) -> tuple[Image.Image, Tensor]:
        result = edit_v12(models, source, instruction, settings, generator, callback)
        return result.image, result.latent

    return edit


def reasoned_edit_v12(models: Models, image: Image.Image, instruction: str, settings: EditSettings,
                      chat: ChatModel | None = None, callback: StepCallback | None = None) -> ReasonedEdit:
    """v1.2's thinking (``settings.think``) and reflection (``settings.reflect`` rounds), as the reference runs
    them, but seeded: the edits draw from one CPU generator across rounds (the reference's generator), and the
    MLLM's sampling from ``settings.seed`` (the reference's is unseeded). ``chat`` replaces the MLLM as the
    thinker (a scripted judge in tests)."""
    if not models.dit.params.version.reasoning_prompts:
        raise ValueError(f"thinking and reflection are v1.2's; this DiT is {models.dit.params.version}: load v1.2's "
                         "DiT and its fine-tuned text encoder")
    if chat is None:
        chat = QwenChat(models.embedder.model, models.embedder.tokenizer, models.embedder.image_processor,
                        seed=settings.seed, max_new_tokens=settings.reasoning_tokens)
    thinker = Thinker(ChatOnDevice(models, chat), max_tries=settings.judge_tries)
    editor = v12_editor(models, settings, callback)
    latents: list[Tensor] = []

    def edit(source: Image.Image, text: str) -> Image.Image:
        picture, tokens = editor(source, text)
        latents.append(tokens)
        return picture

    if settings.reflect:
        run = run_reflection(edit, image, instruction, thinker, rounds=settings.reflect, think=settings.think)
        return ReasonedEdit(run.best_image, run.prompt, run, run.rewrite, latents)
    rewrite = thinker.think(image, instruction)
    return ReasonedEdit(edit(image, rewrite.instruction), rewrite.instruction, None, rewrite, latents)
