"""A tiny random Qwen2.5-VL written in the real Hugging Face file layout, for tests and smoke runs.

The folder mimics ``Qwen/Qwen2.5-VL-7B-Instruct`` as published for transformers 4.49 (the version the
official Step1X-Edit pins): a *flat* ``config.json`` with ``rope_scaling: {"type": "mrope", ...}`` and a
``vision_config``, ``preprocessor_config.json`` with ``min_pixels``/``max_pixels``, ``chat_template.json``,
the full tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``, ``merges.txt``),
``generation_config.json`` and bf16 safetensors weights under the 4.49-era key names (``model.layers.*``,
``visual.*``, ``lm_head.weight``), optionally sharded with a ``model.safetensors.index.json``.

Only the sizes are tiny (hidden 64, 2 layers, 2 vision blocks, head dim 16); the tokenizer is the real one,
so token ids are the real Qwen2.5 ids.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..qwen.packaged import PACKAGED_TOKENIZER
from ..qwen.single_file import CONFIG_METADATA_KEY

__all__ = [
    "QWEN25_VL_CHAT_TEMPLATE",
    "comfy_single_file_tensors",
    "dequantize_scaled_fp8",
    "tiny_qwen_config",
    "tiny_qwen_state_dict",
    "write_comfy_single_file",
    "write_tiny_qwen",
    "write_tiny_qwen_file",
]

# The chat template that Qwen/Qwen2.5-VL-7B-Instruct ships in chat_template.json (the processor's template;
# its tokenizer_config.json carries the text-only Qwen2.5 template instead).
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TOKENIZER_ASSET_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
_VOCAB_SIZE = 151936  # large enough for every special token (<|video_pad|> = 151656)


def tiny_qwen_config() -> dict:
    """The flat (transformers 4.49 era) ``config.json`` of the tiny model."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 128000,
        "max_window_layers": 2,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.49.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 2,
            "hidden_act": "silu",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        # head dim 64 / 4 = 16 -> 8 rotary frequencies, split 2 + 3 + 3 over (t, h, w)
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vocab_size": _VOCAB_SIZE,
    }


def _preprocessor_config() -> dict:
    # As shipped with Qwen2.5-VL-7B-Instruct; Step1X-Edit overrides min/max pixels when loading.
    return {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }


def _generation_config() -> dict:
    return {
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "do_sample": True,
        "eos_token_id": [151645, 151643],
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_p": 0.001,
        "top_k": 1,
        "transformers_version": "4.49.0",
    }


def _text_weight_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    shapes = [("model.embed_tokens.weight", (config["vocab_size"], hidden))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (q_dim, hidden)),
            (p + "self_attn.q_proj.bias", (q_dim,)),
            (p + "self_attn.k_proj.weight", (kv_dim, hidden)),
            (p + "self_attn.k_proj.bias", (kv_dim,)),
            (p + "self_attn.v_proj.weight", (kv_dim, hidden)),
            (p + "self_attn.v_proj.bias", (kv_dim,)),
            (p + "self_attn.o_proj.weight", (hidden, q_dim)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (config["vocab_size"], hidden))]
    return shapes


def _vision_weight_shapes(vision: dict) -> list[tuple[str, tuple[int, ...]]]:
    width, inter = vision["hidden_size"], vision["intermediate_size"]
    patch, temporal = vision["patch_size"], vision["temporal_patch_size"]
    merged = width * vision["spatial_merge_size"] ** 2
    shapes = [("visual.patch_embed.proj.weight", (width, vision["in_chans"], temporal, patch, patch))]
    for i in range(vision["depth"]):
        p = f"visual.blocks.{i}."
        shapes += [
            (p + "norm1.weight", (width,)),
            (p + "attn.qkv.weight", (3 * width, width)),
            (p + "attn.qkv.bias", (3 * width,)),
            (p + "attn.proj.weight", (width, width)),
            (p + "attn.proj.bias", (width,)),
            (p + "norm2.weight", (width,)),
            (p + "mlp.gate_proj.weight", (inter, width)),
            (p + "mlp.gate_proj.bias", (inter,)),
            (p + "mlp.up_proj.weight", (inter, width)),
            (p + "mlp.up_proj.bias", (inter,)),
            (p + "mlp.down_proj.weight", (width, inter)),
            (p + "mlp.down_proj.bias", (width,)),
        ]
    shapes += [
        ("visual.merger.ln_q.weight", (width,)),
        ("visual.merger.mlp.0.weight", (merged, merged)),
        ("visual.merger.mlp.0.bias", (merged,)),
        ("visual.merger.mlp.2.weight", (vision["out_hidden_size"], merged)),
        ("visual.merger.mlp.2.bias", (vision["out_hidden_size"],)),
    ]
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(shape) == 1 and ("norm" in name or "ln_q" in name):
        return 1.0 + 0.1 * noise  # RMSNorm gains around 1
    if name.endswith(".bias"):
        return 0.1 * noise
    fan_in = math.prod(shape[1:])
    return noise / math.sqrt(fan_in)


def _random_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = _text_weight_shapes(config) + _vision_weight_shapes(config["vision_config"])
    return {
        name: _random_tensor(name, shape, generator).to(torch.bfloat16).contiguous() for name, shape in shapes
    }


def _write_weights(folder: Path, state_dict: dict[str, torch.Tensor], shards: int) -> None:
    if shards == 1:
        save_file(state_dict, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(state_dict)
    per_shard = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    for index in range(shards):
        file_name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {name: state_dict[name] for name in names[index * per_shard : (index + 1) * per_shard]}
        save_file(chunk, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in chunk})
    total_size = sum(t.numel() * t.element_size() for t in state_dict.values())
    index_json = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    _write_json(folder / "model.safetensors.index.json", index_json)


@functools.lru_cache(maxsize=1)
def _tokenizer_json_text() -> str:
    """``tokenizer.json`` of the packaged Qwen2.5 tokenizer, as transformers' ``save_pretrained`` writes it."""
    from transformers import AutoTokenizer  # slow import; only needed here

    with resources.as_file(PACKAGED_TOKENIZER) as source:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        return (Path(scratch) / "tokenizer.json").read_text(encoding="utf-8")


def _write_tokenizer(folder: Path) -> None:
    for name in _TOKENIZER_ASSET_FILES:
        with resources.as_file(PACKAGED_TOKENIZER / name) as source:
            shutil.copyfile(source, folder / name)
    (folder / "tokenizer.json").write_text(_tokenizer_json_text(), encoding="utf-8")


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def tiny_qwen_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny model's bf16 weights under the Hub names (with ``lm_head.weight``)."""
    return _random_state_dict(tiny_qwen_config(), seed)


def write_tiny_qwen(
    folder: Path, seed: int = 0, shards: int = 1, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write a tiny random Qwen2.5-VL into ``folder`` in the Qwen2.5-VL-7B-Instruct (transformers 4.49) layout.

    The weights depend only on ``seed`` (or are ``state_dict``, e.g. dequantised fp8 weights). ``shards > 1``
    splits them into ``model-0000i-of-0000n.safetensors`` files with a ``model.safetensors.index.json``, like
    the real checkpoint. Returns ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_qwen_config()
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", _generation_config())
    _write_json(folder / "preprocessor_config.json", _preprocessor_config())
    _write_json(folder / "chat_template.json", {"chat_template": QWEN25_VL_CHAT_TEMPLATE})
    _write_tokenizer(folder)
    _write_weights(folder, state_dict if state_dict is not None else _random_state_dict(config, seed), shards)
    return folder


# --------------------------------------------------------------------------------------------------------
# ComfyUI's single-file layout
# --------------------------------------------------------------------------------------------------------

FP8_MAX = 448.0  # largest float8_e4m3fn value


def _is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    return tensor.ndim == 2 and name.endswith(".weight") and "embed_tokens" not in name


def _scaled_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled fp8 the way ComfyUI's files store it: weight ~ fp8 * scale."""
    scale = weight.float().abs().max().clamp_min(1e-12) / FP8_MAX
    return (weight.float() / scale).to(torch.float8_e4m3fn), scale.reshape(())


def comfy_single_file_tensors(state_dict: dict[str, torch.Tensor], fp8_scaled: bool = False
                              ) -> dict[str, torch.Tensor]:
    """A Hub-named state dict as ComfyUI's text-encoder file holds it: no ``lm_head``; with ``fp8_scaled``,
    every Linear weight fp8 with a float32 ``.scale_weight`` and a ``scaled_fp8`` marker."""
    tensors = {}
    for name, tensor in state_dict.items():
        if name.startswith("lm_head."):
            continue
        if fp8_scaled and _is_linear_weight(name, tensor):
            tensors[name], tensors[name.removesuffix(".weight") + ".scale_weight"] = _scaled_fp8(tensor)
        else:
            tensors[name] = tensor
    if fp8_scaled:
        tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return tensors


def dequantize_scaled_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 weights a scaled-fp8 file stands for (weight = fp8 * scale), under the same names."""
    from ..ops import dequantize

    out = {}
    for name, tensor in tensors.items():
        if name == "scaled_fp8" or name.endswith(".scale_weight"):
            continue
        scale = tensors.get(name.removesuffix(".weight") + ".scale_weight")
        out[name] = dequantize(tensor, scale, torch.float32) if scale is not None else tensor.float()
    return out


def write_comfy_single_file(path: Path, tensors: dict[str, torch.Tensor], config: dict | None) -> Path:
    """Save ``tensors`` as one safetensors file; ``config`` (the model's config.json) goes into the metadata,
    which the loader reads for sizes other than 7B. ComfyUI's own files carry none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    if config is not None:
        metadata[CONFIG_METADATA_KEY] = json.dumps(config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def write_tiny_qwen_file(path: Path, seed: int = 0, fp8_scaled: bool = False) -> Path:
    """The tiny model of ``write_tiny_qwen(seed=seed)`` as one file in ComfyUI's layout (bf16 or fp8 scaled)."""
    tensors = comfy_single_file_tensors(tiny_qwen_state_dict(seed), fp8_scaled=fp8_scaled)
    return write_comfy_single_file(path, tensors, tiny_qwen_config())
