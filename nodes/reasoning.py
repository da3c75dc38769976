"""v1.2's reasoning nodes: Think (the MLLM rewrites the instruction) and Reflect (edit, judge, re-edit).

The MLLM is the loaded text encoder (v1.2's fine-tuned Qwen2.5-VL, loaded with keep_lm_head), answering
through ``step1x_core.reasoning``; each answer first loads it through ComfyUI's model management and checks
for an interrupt. Reflect edits with the same pieces as the graph (v1.2 prompt format, connector, VAE, the
Step1X-Edit Sampler), so previews, progress and interrupt work in every round.
"""

from __future__ import annotations

import json

import torch
from comfy_api.latest import io, ui

import comfy.model_management as mm

from ..step1x_core.images.sizing import (MAX_SIZE_LEVEL, MULTIPLE, pil_to_tensor, resize_to_level, restore_size,
                                         tensor_to_pil)
from ..step1x_core.pipeline.v12_edit import vae_input
from ..step1x_core.reasoning.chat import ChatModel
from ..step1x_core.reasoning.loop import DEFAULT_ROUNDS, run_reflection
from ..step1x_core.reasoning.qwen_chat import MAX_NEW_TOKENS, QwenChat
from ..step1x_core.reasoning.thinker import Thinker
from ..step1x_core.sampling.diffusers import cpu_generator, edit_draws
from ..step1x_core.versions import Version
from .conditioning import connector_conditioning
from .qwen_encoder import QwenEncoder, encode
from .sampler import edit_latent
from .types import CATEGORY, QwenVL
from ..step1x_core.reasoning.report import format_run

JUDGE_TRIES = 20  # the reference's tries per judge stage


class _ManagedChat(ChatModel):
    """Answers with the text encoder loaded by ComfyUI (it may have been offloaded for the DiT meanwhile);
    an interrupt stops between answers."""

    def __init__(self, encoder: QwenEncoder, seed: int, max_new_tokens: int):
        embedder = encoder.embedder
        self.encoder = encoder
        self.inner = QwenChat(embedder.model, embedder.tokenizer, embedder.image_processor, seed=seed,
                              max_new_tokens=max_new_tokens)

    def chat(self, system, content, *, stage: str = "") -> str:
        mm.throw_exception_if_processing_interrupted()
        mm.load_models_gpu([self.encoder.patcher], force_full_load=True)
        return self.inner.chat(system, content, stage=stage)


def _thinker(encoder: QwenEncoder, seed: int, judge_tries: int = JUDGE_TRIES,
             max_new_tokens: int = MAX_NEW_TOKENS) -> Thinker:
    return Thinker(_ManagedChat(encoder, seed, max_new_tokens), max_tries=judge_tries)


def _first_image(image: torch.Tensor):
    return tensor_to_pil(image[0], channels_last=True)


class Step1XEditThink(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditThink",
            display_name="Step1X-Edit Think (v1.2)",
            category=CATEGORY,
            description="v1.2's thinking mode: the MLLM looks at the image and rewrites the instruction into a "
                        "clear, standard edit instruction (the reference's prompts and sampling, seeded). Wire "
                        "the result into Qwen-VL Encode's instruction to see and edit it before encoding.",
            inputs=[
                QwenVL.Input("qwen_vl", tooltip="v1.2's text encoder, loaded with keep_lm_head on."),
                io.Image.Input("image", tooltip="The image to edit (its first frame), as loaded."),
                io.String.Input("instruction", multiline=True, default="",
                                tooltip="The instruction as you would write it; vague or colloquial is fine."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the MLLM's sampling (the reference samples, unseeded)."),
            ],
            outputs=[io.String.Output("rewritten", display_name="instruction",
                                      tooltip="The rewritten instruction.")],
        )

    @classmethod
    def execute(cls, qwen_vl, image, instruction, seed) -> io.NodeOutput:
        rewrite = _thinker(qwen_vl, seed).think(_first_image(image), instruction)
        text = rewrite.instruction
        shown = text if rewrite.failure is None else f"{text}\n({rewrite.failure})"
        return io.NodeOutput(text, ui=ui.PreviewText(shown))


class Step1XEditReflect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditReflect",
            display_name="Step1X-Edit Reflect (v1.2)",
            category=CATEGORY,
            description="v1.2's reflection mode: edits the image, lets the MLLM judge the result against the input "
                        "and the instruction, then re-edits the result with the judge's new instruction or restarts "
                        "from the input, for up to `rounds` edits; returns the best round by the reference's rule.",
            inputs=[
                io.Model.Input("model", tooltip="A Step1X-Edit v1.2 model (Load Step1X-Edit DiT)."),
                QwenVL.Input("qwen_vl", tooltip="v1.2's text encoder, loaded with keep_lm_head on: it encodes the "
                                                "prompts and judges the edits."),
                io.Vae.Input("vae", tooltip="The FLUX VAE (ae.safetensors)."),
                io.Image.Input("image", tooltip="The image to edit (its first frame), as loaded."),
                io.String.Input("instruction", multiline=True, default="",
                                tooltip="The edit; connect Step1X-Edit Think's output, or turn on think below."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="Negative instruction for CFG; the official setting is empty."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the edits' noise (every round draws from one generator, as the "
                                     "command line does) and of the MLLM's sampling."),
                io.Int.Input("steps", default=28, min=1, max=200, tooltip="Denoising steps per edit (official: 28)."),
                io.Float.Input("cfg", default=6.0, min=1.0, max=30.0, step=0.1,
                               tooltip="Guidance scale (official: 6.0)."),
                io.Int.Input("size_level", default=1024, min=MULTIPLE, max=MAX_SIZE_LEVEL, step=MULTIPLE,
                             tooltip="Working resolution: about N×N pixels (official: 1024)."),
                io.Int.Input("rounds", default=DEFAULT_ROUNDS, min=1, max=10,
                             tooltip="At most this many edits, each judged (the reference: 3). Each costs an edit "
                                     "and up to five MLLM answers."),
                io.Boolean.Input("think", default=False,
                                 tooltip="Rewrite the instruction first (v1.2's thinking mode), as Think does."),
                io.Float.Input("norm_cfg_threshold", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Normalised CFG while t > this; 0 (every step) is v1.2's reference."),
                io.Int.Input("judge_tries", default=JUDGE_TRIES, min=1, max=50, optional=True,
                             tooltip="Tries per judging stage before the reference's fallback verdict (20). Lower "
                                     "is faster with a judge that often answers out of format."),
                io.Int.Input("max_new_tokens", default=MAX_NEW_TOKENS, min=1, max=1024, optional=True,
                             tooltip="Length cap of each MLLM answer (the reference: 128)."),
            ],
            outputs=[
                io.Image.Output("best", display_name="image", tooltip="The best round's edit, at the input's size."),
                io.Image.Output("all_rounds", display_name="all_rounds", tooltip="Every round's edit, in order."),
                io.String.Output("judged_instruction", display_name="instruction",
                                 tooltip="The instruction the rounds were judged against (rewritten with think)."),
                io.String.Output("log", display_name="log", tooltip="The judge's verdicts, scores and the choice."),
                io.String.Output("scores", display_name="scores",
                                 tooltip="Each round's judge scores as JSON (score1: editing success and "
                                         "over-editing, score2: naturalness and artifacts)."),
            ],
        )

    @classmethod
    def execute(cls, model, qwen_vl, vae, image, instruction, negative, seed, steps, cfg, size_level, rounds, think,
                norm_cfg_threshold=0.0, judge_tries=JUDGE_TRIES, max_new_tokens=MAX_NEW_TOKENS) -> io.NodeOutput:
        version = model.get_model_object("diffusion_model").params.version
        if not version.reasoning_prompts:
            raise ValueError(f"Step1X-Edit Reflect needs a v1.2 model; this one is {version}")
        generator = cpu_generator(seed)  # the engine's rule: every round draws from one generator

        def edit(source, text: str):
            working = resize_to_level(source, size_level, "lanczos")
            frames = pil_to_tensor(working, channels_last=True)[None]
            positive, neg = connector_conditioning(model, encode(qwen_vl, frames, text, negative, Version.V1_2))
            # The engine's v1.2 VAE input (the source resized with bilinear + antialias), and its two draws;
            # ComfyUI's VAE Encode gives the posterior mean, so the eps draw is spent unused (README).
            pixels = (vae_input(source, *working.size) + 1) / 2
            _, noise = edit_draws(generator, working.height // 8, working.width // 8, torch.float32, "cpu")
            latent = edit_latent(model, positive, neg, {"samples": vae.encode(pixels.permute(0, 2, 3, 1))}, seed, steps,
                                 cfg, norm_cfg_threshold, 1.0, noise=noise)
            decoded = vae.decode(latent["samples"])
            return restore_size(tensor_to_pil(decoded[0], channels_last=True), source.size)

        thinker = _thinker(qwen_vl, seed, judge_tries, max_new_tokens)
        run = run_reflection(edit, _first_image(image), instruction, thinker, rounds=rounds, think=think)
        frames = torch.stack([pil_to_tensor(picture, channels_last=True) for picture in run.images])
        log = format_run(run)
        return io.NodeOutput(frames[run.chosen:run.chosen + 1], frames, run.prompt, log,
                             json.dumps(run.scores, ensure_ascii=False), ui=ui.PreviewText(log))
