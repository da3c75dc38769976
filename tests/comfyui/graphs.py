"""The shared pieces of the ComfyUI tests: the edit graph on the tiny models, running a graph, reading its
saved latent, and the shipped workflows lowered to run on a CPU in seconds. Test files import these from here
(never from one another)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.golden import REPO_ROOT
from tests.release_names import LORA, QWEN_FOLDER, QWEN_FP8_FILE, V11_DIT, VAE

__all__ = ["FAST_SETTINGS", "model_velocity", "pack_module", "INSTRUCTION", "LATENT_TOLERANCE", "QWEN_FOLDER", "QWEN_FP8_FILE", "SIZE", "TINY_LORA",
           "V11_DIT", "WORKFLOWS", "edit_graph", "fast_api_graph", "run_ok", "saved_latent"]

WORKFLOWS = REPO_ROOT / "workflows"
TINY_LORA = LORA  # make_tiny's LoRA, under the release name
INSTRUCTION = "add a red hat to the cat"
SIZE = 64
# ComfyUI's Euler step goes through denoised = x - sigma * v and back; float32 rounding only.
LATENT_TOLERANCE = 1e-4


def edit_graph(seed=0, steps=3, cfg=6.0, threshold=0.93, denoise=1.0, dit=V11_DIT, lora=None, lora_strength=1.0,
               instruction=INSTRUCTION, prefix="edit", qwen=QWEN_FOLDER, weight_dtype="default"):
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
        "2": {"class_type": "Step1XEditImageScale",
              "inputs": {"image": ["1", 0], "size_level": "custom", "custom_size": SIZE, "resample": "bicubic"}},
        "3": {"class_type": "Step1XEditDiTLoader", "inputs": {"dit_name": dit, "weight_dtype": weight_dtype,
                                                              "version": "auto"}},
        "4": {"class_type": "Step1XEditQwenVLLoader",
              "inputs": {"model_folder": qwen, "dtype": "auto", "device": "default"}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "6": {"class_type": "Step1XEditQwenVLEncode",
              "inputs": {"qwen_vl": ["4", 0], "image": ["2", 0], "instruction": instruction, "negative": ""}},
        "7": {"class_type": "Step1XEditConnector", "inputs": {"model": ["3", 0], "embeddings": ["6", 0]}},
        "8": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["5", 0]}},
        "9": {"class_type": "Step1XEditSampler",
              "inputs": {"model": ["3", 0], "positive": ["7", 0], "negative": ["7", 1], "reference_latent": ["8", 0],
                         "seed": seed, "steps": steps, "cfg": cfg, "norm_cfg_threshold": threshold,
                         "denoise": denoise}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["5", 0]}},
        "11": {"class_type": "Step1XEditRestoreSize",
               "inputs": {"image": ["10", 0], "width": ["2", 1], "height": ["2", 2], "resample": "bicubic"}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": prefix}},
        "13": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": prefix}},
    }
    if lora is not None:
        graph["14"] = {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": ["3", 0], "lora_name": lora, "strength_model": lora_strength}}
        graph["9"]["inputs"]["model"] = ["14", 0]
    return graph


def saved_latent(comfyui, result) -> torch.Tensor:
    entry = result.outputs["13"]["latents"][0]
    path = comfyui.workdir / "output" / entry["subfolder"] / entry["filename"]
    return load_file(str(path))["latent_tensor"]


def run_ok(comfyui, graph):
    result = comfyui.run(graph)
    assert result.success, result.error()
    return result



# Lowered so a CPU runs a shipped graph on the tiny models in seconds.
FAST_SETTINGS = {"Step1XEditImageScale": {"size_level": "custom", "custom_size": 64}, "Step1XEditSampler": {"steps": 2},
                 "Step1XEditScheduler": {"steps": 2}, "EmptySD3LatentImage": {"width": 64, "height": 48},
                 "Step1XEditReflect": {"steps": 1, "size_level": 64, "rounds": 1, "judge_tries": 1,
                                       "max_new_tokens": 4}}


def fast_api_graph(name: str) -> dict:
    """workflows/api/<name>.json with FAST_SETTINGS applied."""
    graph = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    for node in graph.values():
        node["inputs"].update(FAST_SETTINGS.get(node["class_type"], {}))
    return graph


def pack_module(name: str):
    """A module of the pack as ComfyUI imported it (``<pack folder>.nodes.<name>``)."""
    import sys

    return next(module for key, module in sys.modules.items() if key.endswith(f".nodes.{name}")
                and "step1x" in key.lower())


def model_velocity(patcher, seed: int = 0) -> torch.Tensor:
    """One call of the model as ComfyUI's samplers make it (BaseModel.apply_model), on fixed inputs."""
    model = patcher.model
    params = model.diffusion_model.params
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 12, generator=generator)
    ref = torch.randn(1, 16, 8, 12, generator=generator)
    context = torch.randn(1, 5, params.connector.in_channels, generator=generator)
    conds = model.extra_conds(cross_attn=context, step1x_txt_mask=torch.ones(1, 5, dtype=torch.long),
                              reference_latents=[ref])
    kwargs = {name: cond.cond for name, cond in conds.items() if name != "c_crossattn"}
    with torch.inference_mode():
        return model.apply_model(x, torch.tensor([0.7]), c_crossattn=conds["c_crossattn"].cond, **kwargs).float()
