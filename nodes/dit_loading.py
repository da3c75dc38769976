"""The Step1X-Edit DiT as a ComfyUI MODEL, built by ComfyUI's own loader.

`comfy.sd.load_diffusion_model_state_dict` is the door native Load Diffusion Model and ComfyUI-GGUF go
through: ComfyUI's detection finds the Step1X-Edit family (``Step1XEditConfig``), ComfyUI picks the weight
and compute dtypes, the layer classes (its fp8 and mixed-precision quantized ops, ``custom_operations`` from
other packs), the patcher class (dynamic VRAM in 0.38) and loads the weights. This node adds only what
ComfyUI cannot know: the file check (names, shapes, storage types, NaN/Inf, the diffusers layout of v1.2's
release converted to the original one) and the optional fp8 matmul.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch

import comfy.model_management
import comfy.sd

from ..step1x_core.dit.checkpoint import LoadedCheckpoint, kept_dtype, unused_by
from ..step1x_core.dit.loading import read_dit_checkpoint
from ..step1x_core.formats.expected import checked_weight
from ..step1x_core.dit.quantized import is_gguf
from .comfy_model import known_params
from .fp8_ops import Fp8MatmulOps
from .patcher import mark_loaded

logger = logging.getLogger(__name__)

# What ComfyUI's quantized formats store beside a layer's weight (`comfy/quant_ops.py`, QUANTIZATION.md: per-layer
# scales and formats; the older "scaled fp8" files: scale_weight, scale_input and a scaled_fp8 marker). The file
# check leaves them to ComfyUI, which reads them while loading.
COMFY_QUANTIZATION_SUFFIXES = (".weight_scale", ".weight_scale_2", ".pre_quant_scale", ".input_scale", ".comfy_quant",
                               ".scale_weight", ".scale_input")


def is_comfy_quantization(name: str) -> bool:
    return name == "scaled_fp8" or name.endswith(COMFY_QUANTIZATION_SUFFIXES)


def check_weights(ckpt: LoadedCheckpoint, weight_dtype: torch.dtype | None) -> None:
    """Refuse NaN/Inf in the file, or values that overflow the chosen weight dtype, before ComfyUI copies them."""
    target = weight_dtype or ckpt.storage_dtype
    for key, tensor in ckpt.state_dict.items():
        checked_weight(tensor, key, ckpt.file_name, kept_dtype(key, tensor, target))


def load_dit(path: str | Path, version: str | None = None, weight_dtype: torch.dtype | None = None,
             fp8_matmul: bool = False, **comfy_options):
    """Read, check and load a Step1X-Edit DiT file or diffusers transformer folder as a ComfyUI MODEL.

    The MODEL remembers this call (``cached_patcher_init``, as ComfyUI's own loaders set it), so ComfyUI can load
    a fresh copy when it needs one: a non-dynamic one for hooks under dynamic VRAM (0.38 calls it again with
    ``disable_dynamic=True``, which ``comfy_options`` passes on), or one per GPU.
    """
    if is_gguf(path):
        raise ValueError(f"{Path(path).name} is a GGUF file: load it with ComfyUI-GGUF's Unet Loader (GGUF) "
                         "(ComfyUI-GGUF custom nodes), which builds it as Step1X-Edit; this node loads .safetensors")
    ckpt = read_dit_checkpoint(path, version, side_tensor=is_comfy_quantization)
    patcher = load_dit_model(ckpt, weight_dtype, fp8_matmul, **comfy_options)
    patcher.cached_patcher_init = (load_dit, (path, version, weight_dtype, fp8_matmul))
    return patcher


def load_dit_model(ckpt: LoadedCheckpoint, weight_dtype: torch.dtype | None = None, fp8_matmul: bool = False,
                   **comfy_options):
    """A ComfyUI MODEL over a checked Step1X-Edit checkpoint (original layout), loaded by ComfyUI.

    ``weight_dtype`` None lets ComfyUI choose, as Load Diffusion Model's "default". ``fp8_matmul`` (with fp8
    weights) multiplies the Linear layers in fp8 where ``comfy.model_management.supports_fp8_compute`` says the
    device can, like Load Diffusion Model's fp8_e4m3fn_fast, but with the activations scaled rather than clipped;
    a file in one of ComfyUI's quantized formats keeps ComfyUI's quantized layers (which read its scales) and
    gets ComfyUI's own fp8 matmul instead. ``comfy_options``: what else ComfyUI's loader takes that this
    ComfyUI knows (``disable_dynamic`` in 0.38); others are dropped.
    """
    check_weights(ckpt, weight_dtype)
    model_options = {}
    if weight_dtype is not None:
        model_options["dtype"] = weight_dtype
    if fp8_matmul and ckpt.side_tensors:
        model_options["fp8_optimizations"] = True
    elif fp8_matmul and comfy.model_management.supports_fp8_compute(comfy.model_management.get_torch_device()):
        model_options["custom_operations"] = Fp8MatmulOps
    # ComfyUI's loader empties the dict (and the metadata) it is given; the checkpoint keeps its own. Tensors the
    # model of this version does not have (a forced version) are left out, as the engine's loader leaves them.
    state_dict = {key: tensor for key, tensor in {**ckpt.state_dict, **ckpt.side_tensors}.items()
                  if not unused_by(ckpt.params.version, key)}
    accepted = inspect.signature(comfy.sd.load_diffusion_model_state_dict).parameters
    extra = {key: value for key, value in comfy_options.items() if key in accepted}
    if "metadata" in accepted:  # 0.3.75 and later
        extra["metadata"] = dict(ckpt.metadata) or None  # where the mixed-precision format names its layers
    with known_params(state_dict, ckpt.params):
        patcher = comfy.sd.load_diffusion_model_state_dict(state_dict, model_options=model_options, **extra)
    if patcher is None:  # cannot happen for a checked file; say so rather than fail later
        raise RuntimeError(f"{ckpt.file_name}: ComfyUI did not recognise this Step1X-Edit DiT")
    mark_loaded(patcher)
    logger.info("Step1X-Edit %s (%s layout): weights %s, compute %s", ckpt.params.version, ckpt.layout,
                patcher.model.get_dtype(), patcher.model.manual_cast_dtype or patcher.model.get_dtype())
    return patcher
