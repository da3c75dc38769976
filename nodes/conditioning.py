"""Qwen-VL encode and the connector: image + instruction -> DiT conditioning (positive, negative)."""

from __future__ import annotations

from comfy_api.latest import io

import comfy.model_management as mm

from .comfy_model import TEXT_EMBEDS, TEXT_MASK, TXT_IDS, TXT_MASK, conditioning_problem
from .guards import check_connector_inputs
from .inputs import check_combos
from ..step1x_core.qwen.encoding import PromptEncoding
from .qwen_encoder import PROMPT_FORMATS, QwenEmbeddings, encode
from .types import CATEGORY, QwenEmbeds, QwenVL


class Step1XEditQwenVLEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditQwenVLEncode",
            display_name="Step1X-Edit Qwen-VL Encode",
            category=CATEGORY,
            description="Reads the image and the instruction with Qwen2.5-VL inside Step1X-Edit's fixed prompt "
                        "template (v1.0/v1.1's or v1.2's); also encodes the negative instruction with the same image "
                        "for CFG. Without an image it encodes for text-to-image (v1.1 and v1.2).",
            inputs=[
                QwenVL.Input("qwen_vl", tooltip="The encoder from Load Step1X-Edit Qwen2.5-VL (for v1.2, its "
                                                "fine-tuned text encoder)."),
                io.Image.Input("image", optional=True,
                               tooltip="The image to edit, already at the working size (Step1X-Edit Image Scale). "
                                       "Each image of a batch gets its own embedding. Leave it unconnected for "
                                       "text-to-image."),
                io.String.Input("instruction", multiline=True, default="",
                                tooltip='What to change, e.g. "add a red hat to the cat". Text inside quotes '
                                        'is tokenised per character (for text rendering), as the model was trained.'),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="Negative instruction for CFG; the official setting is empty. Without an "
                                        "image, empty means the references' long default negative prompt."),
                io.Combo.Input("prompt_format", options=list(PROMPT_FORMATS), default="v1.0 / v1.1", optional=True,
                               tooltip="The prompt template of the DiT you use: v1.2 puts the instruction before "
                                       "the image, keeps more tokens and marks quoted text. Step1X-Edit Connector "
                                       "checks that it fits the model."),
            ],
            outputs=[QwenEmbeds.Output("embeddings", display_name="embeddings",
                                       tooltip="Qwen-VL hidden states and masks for the instruction and the negative.")],
        )

    @classmethod
    def execute(cls, qwen_vl, image=None, instruction="", negative="", prompt_format="v1.0 / v1.1") -> io.NodeOutput:
        check_combos(cls, dict(prompt_format=prompt_format))
        return io.NodeOutput(encode(qwen_vl, image, instruction, negative, PROMPT_FORMATS[prompt_format]))


def _conditioning(prompt: PromptEncoding) -> list:
    out = mm.intermediate_device()
    extra = {TXT_MASK: prompt.mask.to(out)}
    if prompt.text_embeds is not None:  # v1.2
        extra.update({TXT_IDS: prompt.txt_ids.to(out), TEXT_EMBEDS: prompt.text_embeds.to(out),
                      TEXT_MASK: prompt.text_mask.to(out)})
    return [[prompt.hidden.to(out), extra]]


class Step1XEditConnector(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditConnector",
            display_name="Step1X-Edit Connector",
            category=CATEGORY,
            description="Turns the Qwen-VL embeddings into the conditioning of this Step1X-Edit model (checking "
                        "that the encoder fits its connector). The connector itself runs inside sampling, so "
                        "ComfyUI's conditioning nodes (combine, average, zero out, timestep range) act on the "
                        "encoder's output.",
            inputs=[
                io.Model.Input("model", tooltip="The Step1X-Edit model whose connector will read the embeddings."),
                QwenEmbeds.Input("embeddings", tooltip="From Step1X-Edit Qwen-VL Encode."),
            ],
            outputs=[
                io.Conditioning.Output("positive", display_name="positive",
                                       tooltip="Conditioning for the instruction."),
                io.Conditioning.Output("negative", display_name="negative",
                                       tooltip="Conditioning for the negative instruction."),
            ],
        )

    @classmethod
    def execute(cls, model, embeddings: QwenEmbeddings) -> io.NodeOutput:
        return io.NodeOutput(*connector_conditioning(model, embeddings))


def connector_conditioning(model, embeddings: QwenEmbeddings) -> tuple[list, list]:
    """(positive, negative) CONDITIONING of this model for the embeddings, after checking that they fit it."""
    check_connector_inputs(model, embeddings)  # a Step1X-Edit model, an encoder as wide as its connector
    params = model.get_model_object("diffusion_model").params
    problem = conditioning_problem(embeddings.cond.hidden, embeddings.cond.mask, params.connector.in_channels,
                                   params.version, embeddings.prompt_format.reasoning_prompts)
    if problem:
        raise ValueError(problem)
    return _conditioning(embeddings.cond), _conditioning(embeddings.uncond)
