"""Loader nodes: the Step1X-Edit DiT (a ComfyUI MODEL) and the Qwen2.5-VL encoder."""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io


from ..step1x_core.dit.diffusers_config import CLASS_NAME
from ..step1x_core.versions import VERSIONS as STEP1X_VERSIONS
from ..step1x_core.ops import COMPUTE_DTYPES
from .dit_loading import load_dit
from .guards import stop_on_non_finite
from .inputs import check_combos
from .model_lists import model_choices, model_files, require_inside, resolve
from .qwen_encoder import FOLDER as QWEN_FOLDER, load_qwen_encoder, qwen_choices, resolve_model
from .types import CATEGORY, QwenVL

WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn,
                 "fp8_e4m3fn_fast": torch.float8_e4m3fn}
FP8_MATMUL = {"fp8_e4m3fn_fast"}  # as in ComfyUI's Load Diffusion Model: fp8 storage and fp8 matmul
VERSIONS = ["auto", *STEP1X_VERSIONS]
DIT_FOLDER = "diffusion_models"


def dit_choices() -> list[str]:
    """diffusers transformer/ folders (v1.2's release) first, then the single files."""
    return model_choices(DIT_FOLDER, lambda config: config.get("_class_name") == CLASS_NAME)


def _file_state(path) -> tuple[int, int]:
    """Changes when a file is replaced on disk, so ComfyUI's cache reloads instead of serving it stale."""
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size


class Step1XEditDiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditDiTLoader",
            display_name="Load Step1X-Edit DiT",
            category=CATEGORY,
            description="Loads a Step1X-Edit transformer (DiT + connector) from models/diffusion_models/ as a "
                        "ComfyUI MODEL. Version (v1.0/v1.1), layout (original/diffusers) and fp8 storage are "
                        "detected from the file's keys.",
            inputs=[
                io.Combo.Input("dit_name", options=dit_choices(),
                               tooltip="The Step1X-Edit DiT file, e.g. step1x-edit-v1p1-official.safetensors, or "
                                       "v1.2's transformer folder (Step1X-Edit-v1p2/transformer)."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Weight storage. default: ComfyUI's choice for your device; fp8_e4m3fn "
                                       "halves the memory and is cast to the compute dtype one layer at a time; "
                                       "fp8_e4m3fn_fast also multiplies in fp8 on GPUs that support it (RTX 40/50, "
                                       "H100 and newer): faster, slightly lossy."),
                io.Combo.Input("version", options=VERSIONS, default="auto",
                               tooltip="auto detects v1.0 (has connector.scale_factor) or v1.1; override only "
                                       "for a file whose version you know better."),
            ],
            outputs=[io.Model.Output("model", display_name="model",
                                     tooltip="The Step1X-Edit model, managed by ComfyUI (offload, low VRAM, LoRA).")],
        )

    @classmethod
    def fingerprint_inputs(cls, dit_name, weight_dtype, version):
        try:
            return [(p.name, *_file_state(p)) for p in model_files(resolve(DIT_FOLDER, dit_name, "dit_name"))]
        except (FileNotFoundError, ValueError):
            return None  # execute names the problem

    @classmethod
    def execute(cls, dit_name, weight_dtype, version) -> io.NodeOutput:
        require_inside(DIT_FOLDER, dit_name, "dit_name")  # a name leaving the folder is refused as such
        check_combos(cls, dict(dit_name=dit_name, weight_dtype=weight_dtype, version=version),
                     files={"dit_name": DIT_FOLDER})
        patcher = load_dit(resolve(DIT_FOLDER, dit_name, "dit_name"), None if version == "auto" else version,
                           WEIGHT_DTYPES[weight_dtype], fp8_matmul=weight_dtype in FP8_MATMUL)
        # Every sampler (this pack's, KSampler, custom ones) then stops at the first step that makes NaN/Inf.
        patcher.set_model_sampler_post_cfg_function(stop_on_non_finite)
        return io.NodeOutput(patcher)


class Step1XEditQwenVLLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Step1XEditQwenVLLoader",
            display_name="Load Step1X-Edit Qwen2.5-VL",
            category=CATEGORY,
            description="Loads the Qwen2.5-VL-7B-Instruct encoder from models/text_encoders/: a Hugging Face "
                        "folder, or ComfyUI's single file (qwen_2.5_vl_7b.safetensors or "
                        "qwen_2.5_vl_7b_fp8_scaled.safetensors, the one Qwen-Image uses). ComfyUI moves it to "
                        "the GPU for encoding and offloads it after.",
            inputs=[
                io.Combo.Input("model_folder", display_name="model", options=qwen_choices(),
                               tooltip="Qwen2.5-VL-7B-Instruct in models/text_encoders/: the Hugging Face folder "
                                       "(config.json, tokenizer, weights) or ComfyUI's single file. The fp8_scaled "
                                       "file keeps its weights in fp8: about 9 GB instead of 16 GB."),
                io.Combo.Input("dtype", options=list(COMPUTE_DTYPES), default="auto",
                               tooltip="Compute dtype. auto: bfloat16 where the device supports it, else float32. "
                                       "fp8 weights stay fp8 and are cast one layer at a time."),
                io.Combo.Input("device", options=["default", "cpu"], default="default",
                               tooltip="cpu keeps the encoder off the GPU (slower; saves its 9 to 16 GB of VRAM)."),
                io.Boolean.Input("keep_lm_head", default=False, optional=True,
                                 tooltip="Keep the language-model head (1.1 GB) so the encoder can also write text: "
                                         "v1.2's Think and Reflect nodes need it. Encoding alone never uses it."),
            ],
            outputs=[QwenVL.Output("qwen_vl", display_name="qwen_vl",
                                   tooltip="The loaded Qwen2.5-VL encoder.")],
        )

    @classmethod
    def fingerprint_inputs(cls, model_folder, dtype, device, keep_lm_head=False):
        return [(p.name, *_file_state(p)) for p in model_files(resolve_model(model_folder))]

    @classmethod
    def execute(cls, model_folder, dtype, device, keep_lm_head=False) -> io.NodeOutput:
        # A name leaving models/text_encoders/ is refused as such, before the list.
        require_inside(QWEN_FOLDER, model_folder, "model_folder")
        check_combos(cls, dict(model_folder=model_folder, dtype=dtype, device=device),
                     files={"model_folder": QWEN_FOLDER})
        return io.NodeOutput(load_qwen_encoder(model_folder, dtype, device, keep_lm_head))
