"""Step1X-Edit as a ComfyUI model family: model config, BaseModel subclass and the DiT adapter.

ComfyUI builds the DiT with its own `comfy.ops` layers (fp8 storage, low-VRAM weight streaming,
LoRA patches) and its optimized attention, manages it with a `ModelPatcher`, and samples it as a
FLUX-type (rectified flow, sigma = t) model. Conditioning carries the connector's t-independent
part (precomputed once per run by the connector node); the t-dependent refiner runs inside the
model call. Reference latents travel like FLUX Kontext's, as `reference_latents`.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

import comfy.conds
import comfy.ldm.common_dit
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.supported_models_base
import comfy.utils
from comfy import latent_formats
from comfy.ldm.modules.attention import optimized_attention

from ..step1x_core.dit.checkpoint import LoadedCheckpoint
from ..step1x_core.dit.params import DiTParams
from ..step1x_core.dit.connector import ConnectorContext, pairwise_attention_mask
from ..step1x_core.dit.model import Step1XEditDiT
from ..step1x_core.formats.expected import checked_weight
from ..step1x_core.ops import fp8_linear
from ..step1x_core.sampling import image_ids, pack, unpack
from .patcher import Step1XEditModelPatcher

logger = logging.getLogger(__name__)

IMAGE_MODEL = "step1x_edit"


def comfy_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None,
                    skip_reshape: bool = True, **kwargs) -> Tensor:
    """ComfyUI's optimized attention (so --use-sage-attention / --use-flash-attention apply)."""
    return optimized_attention(q, k, v, heads, mask=mask, skip_reshape=skip_reshape)


class Step1XEditComfyDiT(Step1XEditDiT):
    """The core DiT with the call ComfyUI's BaseModel makes: latents in, velocity latents out."""

    def __init__(self, image_model: str, params: DiTParams, dtype=None, device=None, operations=None):
        super().__init__(params, attn_fn=comfy_attention, dtype=dtype, device=device, operations=operations)
        self.dtype = dtype

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor, connector_context: Tensor,
                txt_mask: Tensor, ref_latents: list[Tensor] | None = None, transformer_options=None,
                **kwargs) -> Tensor:
        batch, _, height, width = x.shape
        x = comfy.ldm.common_dit.pad_to_patch_size(x, (2, 2))
        lat_h, lat_w = x.shape[-2:]
        tokens = [pack(x)]
        ids = [image_ids(lat_h, lat_w, batch, device=x.device)]
        offset = self.params.version.reference_offset
        for ref in ref_latents or []:
            ref = comfy.ldm.common_dit.pad_to_patch_size(ref, (2, 2))
            tokens.append(pack(comfy.utils.repeat_to_batch_size(ref, batch).to(x.dtype)))
            ids.append(image_ids(ref.shape[-2], ref.shape[-1], batch, offset, device=x.device))
        ctx = ConnectorContext(tokens=context, context=connector_context,
                               attn_mask=pairwise_attention_mask(txt_mask), y=y)
        txt_ids = torch.zeros(batch, context.shape[1], 3, device=x.device)
        # The official loop feeds t in the latent dtype (bf16): same quantisation here.
        t = timestep.to(x.dtype)
        out = self.forward_context(torch.cat(tokens, dim=1), torch.cat(ids, dim=1), txt_ids, t, ctx)
        out = unpack(out[:, : tokens[0].shape[1]], lat_h, lat_w)
        return out[:, :, :height, :width]


class Step1XEditModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLUX, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=Step1XEditComfyDiT)
        self.memory_usage_factor_conds = ("ref_latents",)

    def encode_adm(self, **kwargs):
        return kwargs.get("pooled_output")

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:  # always 640 tokens: plain batching, no CONDCrossAttn padding
            out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
        for key, name in (("step1x_connector_context", "connector_context"), ("step1x_txt_mask", "txt_mask")):
            value = kwargs.get(key)
            if value is not None:
                out[name] = comfy.conds.CONDRegular(value)
        ref_latents = kwargs.get("reference_latents")
        if ref_latents is not None:
            out["ref_latents"] = comfy.conds.CONDList([self.process_latent_in(lat) for lat in ref_latents])
        return out

    def extra_conds_shapes(self, **kwargs):
        ref_latents = kwargs.get("reference_latents")
        if ref_latents is None:
            return {}
        return {"ref_latents": [1, 16, sum(math.prod(lat.size()) for lat in ref_latents) // 16]}


class Step1XEditConfig(comfy.supported_models_base.BASE):
    unet_config = {"image_model": IMAGE_MODEL}
    unet_extra_config = {}
    sampling_settings = {"shift": 1.15}  # unused by our sampler node (it passes exact sigmas)
    latent_format = latent_formats.Flux
    memory_usage_factor = 3.1  # as FLUX: same blocks, similar sequence lengths
    supported_inference_dtypes = [torch.bfloat16, torch.float32]

    def get_model(self, state_dict, prefix="", device=None):
        return Step1XEditModel(self, device=device)


class Fp8MatmulOps(comfy.ops.manual_cast):
    """ComfyUI's manual-cast layers, with fp8 Linear weights multiplied in fp8 (torch._scaled_mm) after
    scaling the activation into e4m3's range (``step1x_core.ops.fp8_linear``); ComfyUI's own fp8 ops clip
    activations to +-448 instead, and flush those below e4m3's smallest values."""

    class Linear(comfy.ops.manual_cast.Linear):
        def forward_comfy_cast_weights(self, input):
            if self.weight.dtype == torch.float8_e4m3fn:
                weight, bias = comfy.ops.cast_bias_weight(self, input, dtype=self.weight.dtype,
                                                          bias_dtype=input.dtype)[:2]
                out = fp8_linear(input, weight, bias)
                if out is not None:
                    return out
            return super().forward_comfy_cast_weights(input)


def assign_weights(module: torch.nn.Module, sd: dict[str, Tensor], file_name: str = "the DiT file") -> None:
    """Give a module built on the meta device the checkpoint's tensors, each in its parameter's dtype
    (NaN and Inf refused on the way, as the engine's loader does)."""
    own = module.state_dict()
    weights = {}
    for key, tensor in sd.items():
        if key not in own:
            continue  # e.g. v1.0's connector.scale_factor under a forced v1.1
        weights[key] = checked_weight(tensor, key, file_name, own[key].dtype)
    module.load_state_dict(weights, strict=True, assign=True)


def build_model_patcher(ckpt: LoadedCheckpoint, weight_dtype: torch.dtype | None,
                        fp8_matmul: bool = False) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI MODEL over a Step1X-Edit checkpoint, the way ComfyUI loads its own DiTs.

    ``fp8_matmul`` (with fp8 weights) multiplies the Linear layers in fp8 where
    ``comfy.model_management.supports_fp8_compute`` says the device can, like Load Diffusion Model's
    fp8_e4m3fn_fast, but with the activations scaled rather than clipped (``Fp8MatmulOps``).
    """
    sd = ckpt.state_dict
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    config = Step1XEditConfig({"image_model": IMAGE_MODEL, "params": ckpt.params})
    if fp8_matmul and comfy.model_management.supports_fp8_compute(load_device):
        config.custom_operations = Fp8MatmulOps
    unet_dtype = weight_dtype or comfy.model_management.unet_dtype(
        model_params=comfy.utils.calculate_parameters(sd), supported_dtypes=config.supported_inference_dtypes,
        weight_dtype=comfy.utils.weight_dtype(sd))
    manual_cast = comfy.model_management.unet_manual_cast(unet_dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(unet_dtype, manual_cast)
    # Built on the meta device and handed the memory-mapped tensors (converted only where the stored
    # dtype differs), so loading holds one copy of the weights where ComfyUI's usual path holds two.
    model = config.get_model(sd, device="meta")
    assign_weights(model.diffusion_model, sd, ckpt.file_name)
    # Inference only; ComfyUI's fp8 ops also skip their fp8 matmul on modules left in training mode.
    model.diffusion_model.eval().requires_grad_(False)
    model = model.to(offload_device)
    logger.info("Step1X-Edit %s (%s layout): weights %s, compute %s", ckpt.params.version, ckpt.layout,
                unet_dtype, manual_cast or unet_dtype)
    return Step1XEditModelPatcher(model, load_device=load_device, offload_device=offload_device)
