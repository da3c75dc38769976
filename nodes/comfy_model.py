"""Step1X-Edit as a ComfyUI model family: model config, BaseModel subclass and the DiT adapter.

ComfyUI builds the DiT with its own `comfy.ops` layers (fp8 storage, low-VRAM weight streaming,
LoRA patches) and its optimized attention, manages it with a `ModelPatcher`, and samples it as a
FLUX-type (rectified flow, sigma = t) model. The conditioning is the Qwen2.5-VL hidden states and
their mask (from the Connector node), so ComfyUI's conditioning nodes (combine, average, zero out,
timestep ranges) act on the encoder's output as they do on a CLIP's; the connector runs inside the
model call. The call follows FLUX's protocol (`comfy/ldm/flux/model.py`): it goes through the
DIFFUSION_MODEL wrappers (EasyCache...), transformer_options reach attention, and block patches
(`patches_replace["dit"]`, e.g. SkipLayerGuidanceDiT) replace blocks. Reference latents travel like
FLUX Kontext's, as `reference_latents`.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

import comfy.conds
import comfy.ldm.common_dit
import comfy.model_base
import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models_base
import comfy.utils
from comfy import latent_formats
from comfy.ldm.modules.attention import optimized_attention

from ..step1x_core.dit.checkpoint import infer_params
from ..step1x_core.formats.identify import STEP1X_DIT, identify
from ..step1x_core.pipeline.fit import format_problem, prompt_format_of, width_problem
from ..step1x_core.dit.params import DiTParams
from ..step1x_core.dit.model import BlockArgs, Step1XEditDiT, run_block
from ..step1x_core.sampling.latents import image_ids, pack, unpack
from ..step1x_core.versions import Version

logger = logging.getLogger(__name__)

IMAGE_MODEL = "step1x_edit"
TXT_MASK = "step1x_txt_mask"  # the conditioning key the Connector node sets: [B, T] token mask
# v1.2's extra conditioning (its prompt format): the text stream's RoPE ids, Qwen's raw input embeddings and
# the quote mask, which text_token_mapping reads.
TXT_IDS, TEXT_EMBEDS, TEXT_MASK = "step1x_txt_ids", "step1x_text_embeds", "step1x_text_mask"
_MODEL_KWARGS = {TXT_MASK: "txt_mask", TXT_IDS: "txt_ids", TEXT_EMBEDS: "text_embeds", TEXT_MASK: "text_mask"}
# ComfyUI's mixed-precision quantized files (per-layer weight_scale, QUANTIZATION.md) load from ComfyUI 0.3.75 on;
# older ComfyUI would read their fp8 weights without the scales.
MIXED_PRECISION_HELP = ("this Step1X-Edit DiT is in ComfyUI's mixed-precision fp8 format (float8 weights with a "
                        "weight_scale per layer), which needs ComfyUI 0.3.75 or newer: update ComfyUI, or load the "
                        "bf16 file with weight_dtype fp8_e4m3fn, or a GGUF file with ComfyUI-GGUF")
CONDITIONING_HELP = ("Step1X-Edit needs the conditioning from Step1X-Edit Connector (Load Step1X-Edit Qwen2.5-VL -> "
                     "Step1X-Edit Qwen-VL Encode -> Step1X-Edit Connector)")


def comfy_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None,
                    skip_reshape: bool = True, transformer_options: dict | None = None, **kwargs) -> Tensor:
    """ComfyUI's optimized attention (so --use-sage-attention / --use-flash-attention and per-model
    attention overrides in transformer_options apply)."""
    return optimized_attention(q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                               transformer_options=transformer_options or {})


def conditioning_problem(context: Tensor | None, txt_mask: Tensor | None, width: int,
                         version: Version | None = None, has_v12_inputs: bool | None = None) -> str | None:
    """Why this conditioning cannot drive a Step1X-Edit model (of ``version``, when given), or None when it can
    (the engine's fit rules, with what to do in ComfyUI)."""
    if txt_mask is None:
        found = f"width {context.shape[-1]}" if context is not None else "no tensor"
        return (f"{CONDITIONING_HELP}; this conditioning came from another encoder ({found}, no Step1X-Edit token "
                "mask), e.g. CLIP Text Encode or another model's text encode node")
    problem = width_problem(None if context is None else context.shape[-1], width)
    if problem:
        return f"{CONDITIONING_HELP}; {problem}"
    problem = None if version is None or has_v12_inputs is None else format_problem(version, has_v12_inputs)
    if problem:
        return f"{problem}: set Step1X-Edit Qwen-VL Encode's prompt_format to {prompt_format_of(version)}"
    return None


def comfy_block_hook(transformer_options: dict, block_counts: dict[str, int]):
    """The core's block hook filled with ComfyUI's block patches (`patches_replace["dit"]`), called with
    FLUX's argument dicts and names, so patches written for FLUX (SkipLayerGuidanceDiT...) work unchanged.

    As FLUX's block loop does since ComfyUI 0.3.75, ``transformer_options`` says which block runs
    (``block_type`` "double"/"single", ``block_index``, ``total_blocks`` of that type) while it runs: patches
    and attention overrides that act on some blocks only read them there."""
    blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})

    def hook(kind: str, index: int, block: torch.nn.Module, args: BlockArgs) -> BlockArgs:
        transformer_options["block_type"] = kind.removesuffix("_block")
        transformer_options["block_index"] = index
        transformer_options["total_blocks"] = block_counts[kind]

        def original_block(block_args: dict) -> BlockArgs:
            options = block_args.get("transformer_options", transformer_options)
            return run_block(block, block_args, {"transformer_options": options})

        replace = blocks_replace.get((kind, index))
        if replace is None:
            return original_block(args)
        return replace({**args, "attn_mask": None, "transformer_options": transformer_options},
                       {"original_block": original_block})
    return hook


def comfy_input_hook(transformer_options: dict):
    """FLUX's ``post_input`` patches (`transformer_options["patches"]["post_input"]`): each sees the embedded
    img ([target | reference] tokens) and txt streams with their RoPE ids, and returns them, maybe changed."""
    patches = transformer_options.get("patches", {}).get("post_input", [])
    if not patches:
        return None

    def hook(streams: dict[str, Tensor]) -> dict[str, Tensor]:
        for patch in patches:
            out = patch({**streams, "transformer_options": transformer_options})
            streams = {key: out[key] for key in ("img", "txt", "img_ids", "txt_ids")}
        return streams
    return hook


def target_ids(lat_h: int, lat_w: int, batch: int, rope_options: dict | None, device) -> Tensor:
    """The edited image's RoPE ids, scaled and shifted by ``rope_options`` (ComfyUI's ScaleROPE) the way FLUX's
    `process_img` does it: the reference's ids stay as the model was trained."""
    ids = image_ids(lat_h, lat_w, batch, device=device)
    if not rope_options:
        return ids
    ids = ids.clone()
    ids[..., 0] += rope_options.get("shift_t", 0.0)
    ids[..., 1] = ids[..., 1] * rope_options.get("scale_y", 1.0) + rope_options.get("shift_y", 0.0)
    ids[..., 2] = ids[..., 2] * rope_options.get("scale_x", 1.0) + rope_options.get("shift_x", 0.0)
    return ids


class Step1XEditComfyDiT(Step1XEditDiT):
    """The core DiT with the call ComfyUI's BaseModel makes: latents in, velocity latents out."""

    patch_size = 2

    def __init__(self, image_model: str, params: DiTParams, dtype=None, device=None, operations=None, **kwargs):
        # **kwargs: what else ComfyUI puts in a model config's unet_config, now or in later versions.
        super().__init__(params, attn_fn=comfy_attention, dtype=dtype, device=device, operations=operations)
        self.dtype = dtype
        # What native nodes read from a FLUX DiT (RenormCFG reads in_channels, for example).
        self.in_channels, self.out_channels = params.in_channels, params.out_channels
        self.hidden_size, self.num_heads = params.hidden_size, params.num_heads
        self.block_counts = {"double_block": params.depth, "single_block": params.depth_single_blocks}

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None = None,
                txt_mask: Tensor | None = None, ref_latents: list[Tensor] | None = None,
                transformer_options: dict | None = None, **kwargs) -> Tensor:
        transformer_options = transformer_options if transformer_options is not None else {}
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                            transformer_options)
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timestep, context, y, txt_mask, ref_latents, transformer_options, **kwargs)

    def _forward(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None, txt_mask: Tensor | None,
                 ref_latents: list[Tensor] | None, transformer_options: dict, txt_ids: Tensor | None = None,
                 text_embeds: Tensor | None = None, text_mask: Tensor | None = None, **kwargs) -> Tensor:
        problem = conditioning_problem(context, txt_mask, self.params.connector.in_channels, self.params.version,
                                       text_embeds is not None)
        if problem:
            raise ValueError(problem)
        batch, _, height, width = x.shape
        x = comfy.ldm.common_dit.pad_to_patch_size(x, (2, 2))
        lat_h, lat_w = x.shape[-2:]
        tokens = [pack(x)]
        ids = [target_ids(lat_h, lat_w, batch, transformer_options.get("rope_options"), x.device)]
        offset = self.params.version.reference_offset
        for ref in ref_latents or []:
            ref = comfy.ldm.common_dit.pad_to_patch_size(ref, (2, 2))
            tokens.append(pack(comfy.utils.repeat_to_batch_size(ref, batch).to(x.dtype)))
            ids.append(image_ids(ref.shape[-2], ref.shape[-1], batch, offset, device=x.device))
        # The connector's t-independent part, once per call: a few GFLOP against the DiT's hundreds of TFLOP.
        ctx = self.precompute(context, txt_mask.to(x.device), text_embeds, text_mask)
        if txt_ids is None:  # v1.0/v1.1: the text stream sits at the origin
            txt_ids = torch.zeros(batch, context.shape[1], 3, device=x.device)
        else:  # float32 carried as its bits (see extra_conds)
            txt_ids = txt_ids.to(x.device).view(torch.float32)
        # The official loop feeds t in the latent dtype (bf16): same quantisation here.
        t = timestep.to(x.dtype)
        out = self.forward_context(torch.cat(tokens, dim=1), torch.cat(ids, dim=1), txt_ids, t, ctx,
                                   block_hook=comfy_block_hook(transformer_options, self.block_counts),
                                   input_hook=comfy_input_hook(transformer_options))
        out = unpack(out[:, : tokens[0].shape[1]], lat_h, lat_w)
        return out[:, :, :height, :width]


class Step1XEditModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLUX, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=Step1XEditComfyDiT)
        self.memory_usage_factor_conds = ("ref_latents",)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn, txt_mask = kwargs.get("cross_attn"), kwargs.get(TXT_MASK)
        params = self.diffusion_model.params
        problem = conditioning_problem(cross_attn, txt_mask, params.connector.in_channels, params.version,
                                       kwargs.get(TEXT_EMBEDS) is not None)
        if problem:
            raise ValueError(problem)
        if not bool(cross_attn.any()):
            logger.info("Step1X-Edit: a conditioning is all zeros (ConditioningZeroOut?): the model sees a zero Qwen "
                        "embedding through the connector, not the empty instruction it was trained with as the "
                        "negative; for the official negative leave Qwen-VL Encode's negative empty")
        # No padding: prompts of the same length batch (v1.0/v1.1: always 640), others run apart (v1.2 cond and
        # uncond, as the reference runs them).
        out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
        for key, name in _MODEL_KWARGS.items():
            value = kwargs.get(key)
            if value is not None:
                if key == TXT_IDS:  # ComfyUI casts float conds to the model dtype; these fractional ids stay float32
                    value = value.to(torch.float32).view(torch.int32)
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



# What the Load Step1X-Edit DiT node already knows about the file it hands to ComfyUI's loader (its config.json
# can state head counts no shape carries); get_model takes it when the state dict it builds from is that file's.
_KNOWN_PARAMS: ContextVar[tuple[Tensor, DiTParams] | None] = ContextVar("step1x_known_params", default=None)


@contextmanager
def known_params(state_dict: dict[str, Tensor], params: DiTParams):
    token = _KNOWN_PARAMS.set((state_dict["img_in.weight"], params))
    try:
        yield
    finally:
        _KNOWN_PARAMS.reset(token)


def _unprefixed(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if not prefix:
        return state_dict
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


class Step1XEditConfig(comfy.supported_models_base.BASE):
    """The Step1X-Edit family in ComfyUI's model detection (`comfy.supported_models.models`).

    ComfyUI's `detect_unet_config` reads a Step1X-Edit DiT as a FLUX DiT (same blocks, no guidance); this
    config claims those FLUX-shaped files that carry Step1X-Edit's connector, builds the model from the
    file's shapes, and leaves every other file to the configs after it.
    """

    unet_config = {"image_model": IMAGE_MODEL}
    unet_extra_config = {}
    # ComfyUI's FLUX shift, for native schedulers; the Step1X-Edit Sampler and Scheduler nodes compute the
    # official size-dependent shift themselves (see nodes/scheduler.py).
    sampling_settings = {"shift": 1.15}
    latent_format = latent_formats.Flux
    memory_usage_factor = 3.1  # as FLUX: same blocks, similar sequence lengths
    supported_inference_dtypes = [torch.bfloat16, torch.float32]

    @classmethod
    def matches(cls, unet_config, state_dict=None, unet_key_prefix="", **kwargs):
        """Called by ComfyUI's detection for every file it loads (0.38: ``matches(unet_config, state_dict,
        unet_key_prefix=...)``); anything else it may pass later lands in ``kwargs``."""
        if unet_config.get("image_model") == IMAGE_MODEL:
            return True
        if unet_config.get("image_model") != "flux" or state_dict is None:
            return False
        return identify(_unprefixed(state_dict, unet_key_prefix or "")) is STEP1X_DIT

    def get_model(self, state_dict, prefix="", device=None, **kwargs):
        sd = _unprefixed(state_dict, prefix)
        if not hasattr(comfy.ops, "mixed_precision_ops") and any(key.endswith(".weight_scale") for key in sd):
            raise ValueError(MIXED_PRECISION_HELP)
        known = _KNOWN_PARAMS.get()
        params = known[1] if known is not None and sd.get("img_in.weight") is known[0] else infer_params(sd)
        # unet_config keeps what ComfyUI and other packs put there (the weight dtype from set_inference_dtype,
        # disable_unet_model_creation...); the DiT takes its shapes from params and ignores FLUX's detected ones.
        self.unet_config = {**self.unet_config, "image_model": IMAGE_MODEL, "params": params}
        return Step1XEditModel(self, device=device)
