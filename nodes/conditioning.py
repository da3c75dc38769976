"""Qwen-VL encode and the connector: image + instruction -> DiT conditioning (positive, negative)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.model_management as mm

from ..step1x_core.dit.params import DiTParams
from .comfy_model import TXT_MASK, conditioning_problem
from .qwen_encoder import QwenEmbeddings, encode
from .types import CATEGORY, QwenEmbeds, QwenVL


class Step1XEditQwenVLEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditQwenVLEncode",
            display_name="Step1X-Edit Qwen-VL Encode",
            category=CATEGORY,
            description="Reads the image and the instruction with Qwen2.5-VL inside Step1X-Edit's fixed prompt "
                        "template; also encodes the negative instruction with the same image for CFG.",
            inputs=[
                QwenVL.Input("qwen_vl", tooltip="The encoder from Load Step1X-Edit Qwen2.5-VL."),
                io.Image.Input("image", tooltip="The image to edit, already at the working size (Step1X-Edit "
                                                "Image Scale). Each image of a batch gets its own embedding."),
                io.String.Input("instruction", multiline=True, default="",
                                tooltip='What to change, e.g. "add a red hat to the cat". Text inside quotes '
                                        'is tokenised per character (for text rendering), as the model was trained.'),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="Negative instruction for CFG; the official setting is empty."),
            ],
            outputs=[QwenEmbeds.Output("embeddings", display_name="embeddings",
                                       tooltip="Qwen-VL hidden states and masks for the instruction and the negative.")],
        )

    @classmethod
    def execute(cls, qwen_vl, image, instruction, negative) -> io.NodeOutput:
        return io.NodeOutput(encode(qwen_vl, image, instruction, negative))


def _conditioning(embeds: torch.Tensor, mask: torch.Tensor) -> list:
    out = mm.intermediate_device()
    return [[embeds.to(out), {TXT_MASK: mask.to(out)}]]


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
        dit = model.get_model_object("diffusion_model")
        params = getattr(dit, "params", None)
        if not isinstance(params, DiTParams):
            raise ValueError("Step1X-Edit Connector needs a Step1X-Edit model (Load Step1X-Edit DiT), got "
                             f"{type(dit).__name__}")
        problem = conditioning_problem(embeddings.cond, embeddings.cond_mask, params.connector.in_channels)
        if problem:
            raise ValueError(problem)
        return io.NodeOutput(_conditioning(embeddings.cond, embeddings.cond_mask),
                             _conditioning(embeddings.uncond, embeddings.uncond_mask))
