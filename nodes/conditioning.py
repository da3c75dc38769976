"""Qwen-VL encode and the connector: image + instruction -> DiT conditioning (positive, negative)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.model_management as mm

from .guards import check_connector_inputs
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


def _conditioning(dit, embeds: torch.Tensor, mask: torch.Tensor, device, dtype) -> list:
    ctx = dit.connector.precompute(embeds.to(device, dtype), mask.to(device))
    out = mm.intermediate_device()
    return [[ctx.tokens.to(out), {"pooled_output": ctx.y.to(out), "step1x_connector_context": ctx.context.to(out),
                                  "step1x_txt_mask": mask.to(out)}]]


class Step1XEditConnector(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditConnector",
            display_name="Step1X-Edit Connector",
            category=CATEGORY,
            description="Runs the t-independent part of Step1X-Edit's connector once and returns the DiT "
                        "conditioning; the timestep-dependent refiner runs inside sampling.",
            inputs=[
                io.Model.Input("model", tooltip="The Step1X-Edit model (its connector weights are used)."),
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
        check_connector_inputs(model, embeddings)
        mm.load_models_gpu([model])
        base = model.model
        dtype = base.manual_cast_dtype or base.get_dtype()
        dit = base.diffusion_model
        with torch.inference_mode():
            positive = _conditioning(dit, embeddings.cond, embeddings.cond_mask, model.load_device, dtype)
            negative = _conditioning(dit, embeddings.uncond, embeddings.uncond_mask, model.load_device, dtype)
        return io.NodeOutput(positive, negative)
