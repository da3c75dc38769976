"""The three loaded parts of a pipeline (DiT, VAE, Qwen-VL encoder) and the stages every flow shares."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from PIL import Image
from torch import Tensor, nn

from ..dit.model import Step1XEditDiT
from ..finite import require_finite_tensor
from ..images.sizing import tensor_to_pil
from ..qwen.embedder import QwenVLEmbedder
from ..qwen.encoding import PromptEncoding
from ..sampling.latents import unpack
from ..sampling.loop import DiTText
from ..vae.model import AutoEncoder
from .fit import check_encoder_width, format_problem, prompt_format_of

VAE_CAUSE = ("the VAE's numbers (its weights were checked when loaded; a float16 VAE overflows: it runs in "
             "float32 here)")
CONNECTOR_CAUSE = "the DiT's connector weights or the compute dtype (float16 overflows: use bfloat16 or float32)"


class Models:
    """DiT, VAE and text encoder, run on ``device`` in ``dtype``; with ``offload`` each part waits on the CPU
    and visits the device only for its own stage."""

    def __init__(self, dit: Step1XEditDiT, vae: AutoEncoder, embedder: QwenVLEmbedder,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, offload: bool = False):
        check_encoder_width(embedder.hidden_size, dit.params.connector.in_channels)
        self.dit, self.vae, self.embedder = dit, vae, embedder
        self.device, self.dtype, self.offload = torch.device(device), dtype, offload

    @property
    def version(self) -> str:
        return self.dit.params.version

    @contextlib.contextmanager
    def on_device(self, module: nn.Module | QwenVLEmbedder) -> Iterator[None]:
        """With offload, a model visits the compute device only for its own stage.

        Not accelerate's ``cpu_offload_with_hook``: its hook moves a model when that model's ``forward``
        runs, but these stages enter through ``encode``/``decode``, the connector's ``precompute`` and
        transformers' inner backbone, so it would take hooks on five inner modules, chained and released
        by hand, to make the same moves this block makes explicitly (same transfers, same peak memory).
        """
        if not self.offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def dit_text(self, encoding: PromptEncoding) -> DiTText:
        """An encoded prompt (either format) -> what the DiT reads: the connector's t-independent context (and
        v1.2's mapped quote tokens) and the text ids, on the compute device."""
        params = self.dit.params
        problem = format_problem(params.version, encoding.text_embeds is not None)
        if problem:
            raise ValueError(f"{problem}: encode it in the {prompt_format_of(params.version)} format")
        device, dtype = self.device, self.dtype
        with contextlib.ExitStack() as stack:  # only what precompute runs visits the device
            for part in (self.dit.connector, getattr(self.dit, "text_token_mapping", None)):
                if part is not None:
                    stack.enter_context(self.on_device(part))
            ctx = self.dit.precompute(
                encoding.hidden.to(device, dtype), encoding.mask.to(device),
                None if encoding.text_embeds is None else encoding.text_embeds.to(device, dtype),
                None if encoding.text_mask is None else encoding.text_mask.to(device))
        for part in (ctx.tokens, ctx.context, ctx.y):
            require_finite_tensor("the connector's output", part, CONNECTOR_CAUSE)
        return DiTText(ctx, encoding.txt_ids.to(device))

    @torch.inference_mode()
    def encode_image(self, image: Tensor) -> Tensor:
        """[1, 3, H, W] in [0, 1] -> scaled latent [1, 16, H/8, W/8] (posterior mean)."""
        require_finite_tensor("the input image", image, "its pixels must be finite numbers")
        with self.on_device(self.vae):
            latent = self.vae.encode(image.to(self.device, torch.float32) * 2 - 1)
        return require_finite_tensor("the VAE's latent of the input image", latent, VAE_CAUSE)

    @torch.inference_mode()
    def decode(self, latent: Tensor) -> Tensor:
        """Latent [1, 16, h, w] -> pixels [1, 3, 8h, 8w] in [0, 1]."""
        with self.on_device(self.vae):
            pixels = self.vae.decode(latent.to(self.device, torch.float32))
        return (require_finite_tensor("the decoded image", pixels, VAE_CAUSE).clamp(-1, 1) + 1) / 2

    @torch.inference_mode()
    def decode_rounded(self, tokens: Tensor, latent_h: int, latent_w: int) -> Image.Image:
        """Packed tokens -> picture as the diffusers pipeline decodes it (in the VAE's dtype, rounded to 8 bits)."""
        latent = unpack(tokens, latent_h, latent_w)
        with self.on_device(self.vae):
            decoded = self.vae.decode(latent.to(self.device, next(self.vae.parameters()).dtype))
        pixels = require_finite_tensor("the decoded image", decoded.float(), VAE_CAUSE)
        return tensor_to_pil((pixels / 2 + 0.5).clamp(0, 1), rounding=True)
