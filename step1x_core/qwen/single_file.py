"""Qwen2.5-VL-7B-Instruct from one safetensors file, as ComfyUI ships it for Qwen-Image.

ComfyUI users keep this encoder as a single file in ``models/text_encoders/``:
``qwen_2.5_vl_7b.safetensors`` (bf16) or ``qwen_2.5_vl_7b_fp8_scaled.safetensors``. Both hold the Hugging
Face checkpoint's tensors under the Hub's names (``model.layers.*``, ``visual.*``), without ``lm_head``.
The "fp8 scaled" file stores every Linear weight as float8_e4m3fn with a float32 ``<layer>.scale_weight``
beside it (real weight = stored weight * scale) and a ``scaled_fp8`` marker tensor.

Loading reads the layout from the names, shapes and dtypes alone, checks it against the architecture, builds
the model without allocating weights, and hands it the memory-mapped tensors. fp8 Linear layers become
``ScaledFp8Linear``: they stay fp8 in memory and are dequantised one layer at a time. A file may carry its
Hugging Face ``config.json`` in its safetensors metadata under ``config`` (the pack's tiny test files do);
ComfyUI's files do not, and get the packaged Qwen2.5-VL-7B-Instruct config.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..formats.expected import checked_weight, describe_problems, find_problems
from ..formats.identify import QWEN2, identify
from ..formats.safetensors_file import ModelFileError, load_tensors, read_header
from ..ops import FP8_DTYPES, ScaledFp8Linear, dequantize
from .expected import qwen_expected
from .names import hub_name
from .packaged import PACKAGED_CONFIG
from .transformers_versions import dtype_kwarg

__all__ = ["CONFIG_METADATA_KEY", "QwenFileError", "QwenFileLayout", "attach_lm_head", "drop_lm_head", "load_qwen_file",
           "read_layout"]

CONFIG_METADATA_KEY = "config"

_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI's spelling, and the newer one
# Activation scales only matter to fp8 matmuls; comfy_quant describes the format, which the dtypes show too.
_IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
_IGNORED_KEYS = {"scaled_fp8"}  # ComfyUI's marker that the file is fp8 scaled
_EMBED = "model.embed_tokens.weight"
_SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")

# (hidden size, decoder layers) of the published Qwen2.5-VL sizes, to name a wrong file.
_KNOWN_SIZES = {
    (2048, 36): "Qwen2.5-VL-3B-Instruct (the text encoder of OmniGen2)",
    (3584, 28): "Qwen2.5-VL-7B-Instruct",
    (5120, 64): "Qwen2.5-VL-32B-Instruct",
    (8192, 80): "Qwen2.5-VL-72B-Instruct",
}
_SEVEN_B = (3584, 28)
_FIX = ("Fix: use ComfyUI's qwen_2.5_vl_7b_fp8_scaled.safetensors or qwen_2.5_vl_7b.safetensors (the Qwen-Image "
        "text encoder, in models/text_encoders/), or the Hugging Face Qwen/Qwen2.5-VL-7B-Instruct folder")


def drop_lm_head(model: nn.Module) -> nn.Module:
    """The LM head (1.1 GB in the 7B) is never used: Step1X-Edit reads hidden states, not logits."""
    model.lm_head = nn.Identity()
    return model


class QwenFileError(ModelFileError):
    """A single file that cannot be used as Step1X-Edit's Qwen2.5-VL; the message says what it is and the fix."""


# --------------------------------------------------------------------------------------------------------
# Layout: names, scales, and what the file is
# --------------------------------------------------------------------------------------------------------


def _strip_wrapper(names: list[str]) -> str:
    """A prefix some tools put before every key (e.g. ComfyUI's ``qwen25_7b.transformer.``), or ''."""
    for name in names:
        for anchor in (_EMBED, "model.language_model.embed_tokens.weight"):
            if name.endswith(anchor) and name != anchor:
                return name[: -len(anchor)]
    return ""


@dataclass
class QwenFileLayout:
    """A file's tensors under Hub names: ``weights`` (lm_head dropped), per-tensor ``scales`` for fp8
    weights, and the config the file carries in its metadata (if any)."""

    weights: dict[str, Tensor]
    scales: dict[str, Tensor] = field(default_factory=dict)
    config: dict[str, Any] | None = None

    @property
    def fp8_names(self) -> list[str]:
        return [name for name, tensor in self.weights.items() if tensor.dtype in FP8_DTYPES]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.weights[name].shape)


def read_layout(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> QwenFileLayout:
    """Sort a file's tensors (only names, shapes and dtypes are looked at) into a ``QwenFileLayout``."""
    prefix = _strip_wrapper(list(tensors))
    weights: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        name = hub_name(key[len(prefix):] if prefix and key.startswith(prefix) else key)
        if name in _IGNORED_KEYS or name.endswith(_IGNORED_SUFFIXES) or name.startswith("lm_head."):
            continue  # the LM head is never used: only hidden states are read
        scale_suffix = next((s for s in _SCALE_SUFFIXES if name.endswith(s)), None)
        if scale_suffix:
            scales[name[: -len(scale_suffix)] + ".weight"] = tensor
        else:
            weights[name] = tensor
    return QwenFileLayout(weights, scales, _metadata_config(metadata or {}))


def _metadata_config(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    text = metadata.get(CONFIG_METADATA_KEY)
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise QwenFileError(f"its '{CONFIG_METADATA_KEY}' metadata is not valid JSON ({error})") from error
    if not isinstance(config, dict) or config.get("model_type") != "qwen2_5_vl":
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise QwenFileError(f"its '{CONFIG_METADATA_KEY}' metadata describes {found!r}, not a Qwen2.5-VL "
                            "(model_type 'qwen2_5_vl')")
    return config


def _layer_count(names: set[str]) -> int:
    layers = {int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    return max(layers) + 1 if layers else 0


def check_qwen25_vl_7b(layout: QwenFileLayout, file_name: str = "") -> None:
    """Refuse files that are not Qwen2.5-VL-7B-Instruct, naming what they are instead."""
    names = set(layout.weights)
    if _SHARD_NAME.search(file_name):
        raise QwenFileError("is one shard of a sharded Hugging Face checkpoint; pick the folder that holds "
                            "all the shards (with config.json), not one of its files")
    kind = identify(names)
    if kind is not QWEN2 or _EMBED not in names:
        found = kind.description if kind else (
            f"no Qwen2.5-VL tensors ({_EMBED} is missing; the file holds {', '.join(sorted(names)[:4]) or 'no tensors'}, ...)")
        raise QwenFileError(f"is {found}. Step1X-Edit needs Qwen2.5-VL-7B-Instruct. {_FIX}")
    if not any(n.startswith("visual.") for n in names):
        raise QwenFileError(
            "has no vision tower (no visual.* tensors): it is a text-only Qwen2.5 export, but Step1X-Edit shows "
            "the reference image to Qwen2.5-VL. " + _FIX + " (ComfyUI's current file includes the vision weights)"
        )
    size = (layout.shape(_EMBED)[1], _layer_count(names))
    # A file may declare another size in its metadata (the tiny test models do), but never a published
    # size other than 7B: the DiT's connector reads 3584-wide hidden states.
    if size != _SEVEN_B and (size in _KNOWN_SIZES or layout.config is None):
        described = _KNOWN_SIZES.get(size, f"a Qwen2.5-VL of hidden size {size[0]} with {size[1]} layers")
        raise QwenFileError(f"is {described}; Step1X-Edit was trained with Qwen2.5-VL-7B-Instruct (hidden size "
                            f"3584, 28 layers). {_FIX}")


def check_scales(layout: QwenFileLayout) -> None:
    """Scales must belong to fp8 weights and be per-tensor or per-output-row (not block-wise)."""
    for name, scale in layout.scales.items():
        weight = layout.weights.get(name)
        if weight is None:
            raise QwenFileError(f"has a scale for {name}, which the file does not hold")
        rows = weight.shape[0]
        if scale.numel() != 1 and tuple(scale.shape) not in {(rows,), (rows, 1)}:
            raise QwenFileError(f"stores {name} with a scale of shape {tuple(scale.shape)} (block-wise "
                                "quantisation), which this pack cannot read. " + _FIX)
    for name in layout.weights:
        dtype = layout.weights[name].dtype
        if not (dtype.is_floating_point or dtype in FP8_DTYPES):
            raise QwenFileError(f"stores {name} as {dtype} (integer-quantised weights), which this pack "
                                "cannot read. " + _FIX)


# --------------------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------------------


def qwen_config(layout: QwenFileLayout) -> Any:
    """The file's own config if it carries one, else the packaged Qwen2.5-VL-7B-Instruct config."""
    from transformers import Qwen2_5_VLConfig

    if layout.config is not None:
        return Qwen2_5_VLConfig.from_dict(layout.config)
    return Qwen2_5_VLConfig.from_pretrained(str(PACKAGED_CONFIG))


def build_skeleton(config: Any, dtype: torch.dtype, attn_implementation: str | None = None) -> nn.Module:
    """The model with its parameters on the meta device (no memory) and its rotary buffers computed."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLForConditionalGeneration

    kwargs: dict[str, Any] = dtype_kwarg(dtype)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, **kwargs)
    return drop_lm_head(model)


def _expected_shapes(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Hub name -> (the running transformers' name, shape) for every weight the model needs."""
    return {hub_name(key): (key, tuple(t.shape)) for key, t in model.state_dict().items()}


def check_architecture(layout: QwenFileLayout, model: nn.Module, source: str = "its config") -> None:
    """Every tensor of the file against ``model`` (built from the config, on meta): names, shapes, dtypes, the
    config's layer counts and widths (the shared check every loader uses)."""
    expected = qwen_expected(model, model.config, source, _FIX)
    problems = find_problems(expected, {n: tuple(t.shape) for n, t in layout.weights.items()},
                             {n: t.dtype for n, t in layout.weights.items()})
    if problems:
        raise QwenFileError(describe_problems(expected, problems))


def _scale_shape(scale: Tensor) -> tuple[int, ...]:
    return () if scale.numel() == 1 else (scale.shape[0],)


def _use_scaled_fp8_layers(model: nn.Module, layout: QwenFileLayout, names: dict[str, str]) -> set[str]:
    """Swap each Linear whose file weight is fp8 for a ScaledFp8Linear (on meta); return those weight names."""
    swapped = set()
    for weight_name in layout.fp8_names:
        module_path = names[weight_name].removesuffix(".weight")
        linear = model.get_submodule(module_path)
        if type(linear) is not nn.Linear:
            continue  # e.g. a conv: dequantised once at load instead
        scale = layout.scales.get(weight_name)
        replacement = ScaledFp8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      device="meta", dtype=layout.weights[weight_name].dtype,
                                      scale_shape=_scale_shape(scale) if scale is not None else ())
        parent_path, _, child = module_path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, replacement)
        swapped.add(weight_name)
    return swapped


def _state_dict(layout: QwenFileLayout, names: dict[str, str], fp8_layers: set[str], dtype: torch.dtype
                ) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for name, tensor in layout.weights.items():
        key = names[name]
        scale = layout.scales.get(name)
        if name in fp8_layers:
            state[key] = checked_weight(tensor, name, "", error=QwenFileError)  # stays fp8
            unit = torch.ones(())  # fp8 stored without a scale
            scale = unit if scale is None else scale.float().reshape(_scale_shape(scale))
            state[key.removesuffix(".weight") + ".scale_weight"] = checked_weight(scale, name + " scale", "",
                                                                                 error=QwenFileError)
        elif tensor.dtype in FP8_DTYPES or scale is not None:  # e.g. an fp8 conv: dequantised once, here
            state[key] = checked_weight(dequantize(tensor, scale if scale is not None else torch.ones(()), dtype),
                                        name, "", error=QwenFileError)
        else:
            state[key] = checked_weight(tensor, name, "", dtype, error=QwenFileError)
    return state


def assemble(layout: QwenFileLayout, config: Any, dtype: torch.dtype,
             attn_implementation: str | None = None) -> nn.Module:
    """Build the model for ``layout`` and give it the file's tensors (fp8 Linear weights stay fp8)."""
    model = build_skeleton(config, dtype, attn_implementation)
    check_architecture(layout, model, "its 'config' metadata" if layout.config is not None else
                       "Qwen2.5-VL-7B-Instruct's config")
    names = {hub: key for hub, (key, _) in _expected_shapes(model).items()}
    fp8_layers = _use_scaled_fp8_layers(model, layout, names)
    model.load_state_dict(_state_dict(layout, names, fp8_layers, dtype), strict=True, assign=True)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"Qwen2.5-VL tensors left without weights: {left_on_meta[:5]}")
    return model.eval().requires_grad_(False)


def attach_lm_head(model: nn.Module, tensors: Mapping[str, Tensor], dtype: torch.dtype) -> nn.Module:
    """Give a model built without its LM head the head back, for generating text (v1.2's thinker): the
    file's ``lm_head.weight`` (fp8 dequantised), or the input embeddings when the config ties them."""
    found = {name.rpartition("lm_head.")[2]: tensor for name, tensor in tensors.items() if "lm_head." in name}
    weight = found.get("weight")
    embeddings = model.get_input_embeddings()
    if weight is None:
        if not getattr(model.config, "tie_word_embeddings", False):
            raise QwenFileError("has no lm_head.weight: the LM head is left out of ComfyUI's single files, and "
                                "thinking and reflection need it to write text. Fix: load the text encoder from "
                                "its Hugging Face folder (Step1X-Edit v1.2's text_encoder/)")
        weight = embeddings.weight
    scale = next((found[s.lstrip(".")] for s in _SCALE_SUFFIXES if s.lstrip(".") in found), None)
    if weight.dtype in FP8_DTYPES or scale is not None:
        weight = dequantize(weight, scale if scale is not None else torch.ones(()), dtype)
    if tuple(weight.shape) != (embeddings.num_embeddings, embeddings.embedding_dim):
        raise QwenFileError(f"has lm_head.weight of shape {tuple(weight.shape)}, expected "
                            f"{(embeddings.num_embeddings, embeddings.embedding_dim)}. {_FIX}")
    head = nn.Linear(embeddings.embedding_dim, embeddings.num_embeddings, bias=False, device="meta")
    head.weight = weight if weight is embeddings.weight else nn.Parameter(weight.to(dtype), requires_grad=False)
    model.lm_head = head
    return model


def load_qwen_file(path: str | Path, dtype: torch.dtype = torch.bfloat16,
                   attn_implementation: str | None = None, keep_lm_head: bool = False) -> nn.Module:
    """Load Qwen2.5-VL-7B-Instruct from one safetensors file (ComfyUI's layout, bf16 or fp8 scaled).

    ``keep_lm_head``: keep the LM head (needed to generate text; the encoder alone never uses it).
    Raises ``QwenFileError`` naming the file, what it holds and the fix when it is anything else.
    """
    path = Path(path).expanduser()
    try:
        tensors = load_tensors(path, QwenFileError)
        layout = read_layout(tensors, read_header(path, QwenFileError).metadata)
        check_qwen25_vl_7b(layout, path.name)
        check_scales(layout)
        model = assemble(layout, qwen_config(layout), dtype, attn_implementation)
        return attach_lm_head(model, tensors, dtype) if keep_lm_head else model
    except QwenFileError as error:
        message = str(error)
        raise QwenFileError(message if message.startswith(path.name) else f"{path.name}: {message}") from error
