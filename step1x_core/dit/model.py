"""The Step1X-Edit DiT: connector + FLUX-shaped MMDiT without guidance embedding.

The forward takes packed tokens only (patchify, ids, schedule and the Euler loop live in
`sampling.py`). Image tokens are [target | reference]; the output covers all of them and the caller
keeps the target part.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .attention import AttentionFn, default_attention
from .params import DiTParams
from .connector import ConnectorContext, Qwen2Connector
from .layers import DoubleStreamBlock, EmbedND, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding


class Step1XEditDiT(nn.Module):
    def __init__(self, params: DiTParams, attn_fn: AttentionFn | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None, operations=nn):
        super().__init__()
        self.params = params
        attn_fn = attn_fn or default_attention()
        factory = dict(dtype=dtype, device=device, operations=operations)
        self.pe_embedder = EmbedND(params.theta, params.axes_dim)
        self.img_in = operations.Linear(params.in_channels, params.hidden_size, bias=True, dtype=dtype, device=device)
        self.time_in = MLPEmbedder(256, params.hidden_size, **factory)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size, **factory)
        self.txt_in = operations.Linear(params.context_in_dim, params.hidden_size, dtype=dtype, device=device)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias,
                              attn_fn=attn_fn, **factory)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, attn_fn=attn_fn, **factory)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(params.hidden_size, params.out_channels, **factory)
        self.connector = Qwen2Connector(params.connector, params.version.has_connector_scale_factor, **factory)
        if params.version.has_text_token_mapping:  # v1.2: raw Qwen embeddings of quoted characters -> text tokens
            self.text_token_mapping = operations.Linear(params.connector.in_channels, params.connector.hidden_size,
                                                        dtype=dtype, device=device)

    def compile_blocks(self, **options) -> None:
        """torch.compile each transformer block in place (the first call pays the compile time)."""
        for block in [*self.double_blocks, *self.single_blocks]:
            block.compile(**options)

    def set_attention(self, attn_fn: AttentionFn) -> None:
        """Swap the attention backend of every block (e.g. ComfyUI's optimized attention)."""
        for block in [*self.double_blocks, *self.single_blocks]:
            block.attn_fn = attn_fn

    def forward(self, img: Tensor, img_ids: Tensor, txt_ids: Tensor, timesteps: Tensor,
                llm_embedding: Tensor, t_vec: Tensor, mask: Tensor) -> Tensor:
        """The official signature: runs the connector on the Qwen-VL embeddings, then the DiT."""
        return self.forward_context(img, img_ids, txt_ids, timesteps, self.connector.precompute(llm_embedding, mask),
                                    t_vec)

    def precompute(self, llm_embedding: Tensor, mask: Tensor, text_embeds: Tensor | None = None,
                   text_mask: Tensor | None = None) -> ConnectorContext:
        """The t-independent part of the text path, once per edit: the connector's, and for v1.2 the mapped
        embeddings of the quoted characters (``text_embeds`` are Qwen's raw input embeddings, ``text_mask`` is
        1 on quoted characters)."""
        ctx = self.connector.precompute(llm_embedding, mask)
        if hasattr(self, "text_token_mapping"):
            if text_embeds is None or text_mask is None:
                raise ValueError("a v1.2 DiT needs the raw text embeddings and the quote mask of the v1.2 prompt "
                                 "encoding (encode the instruction with the v1.2 format)")
            # The mask is an integer tensor: masked rows, bias included, become exactly 0.
            ctx.mapped = self.text_token_mapping(text_embeds) * text_mask[..., None]
        return ctx

    def forward_context(self, img: Tensor, img_ids: Tensor, txt_ids: Tensor, timesteps: Tensor,
                        ctx: ConnectorContext, t_vec: Tensor | None = None, cache: StepCache | None = None,
                        block_hook: BlockHook | None = None, attn_options: dict | None = None,
                        input_hook: InputHook | None = None) -> Tensor:
        """The DiT with the connector's t-independent part already computed (once per edit).

        img [B, L_img, in_channels], img_ids [B, L_img, 3], txt_ids [B, L_txt, 3], timesteps [B] in
        [0, 1]; t_vec (the connector's t) defaults to timesteps. Returns [B, L_img, out_channels].
        `cache` (optional, lossy) skips the blocks after the first when its output barely changed.
        `block_hook` and `attn_options`: see `forward_tokens`. ``input_hook`` sees the embedded streams and their
        ids before RoPE is computed and may replace them (a host's "post input" patches, as FLUX has).
        """
        if img.ndim != 3:
            raise ValueError(f"img must be packed tokens [B, L, {self.params.in_channels}], got shape {tuple(img.shape)}")
        txt = self.connector.refine(ctx, timesteps if t_vec is None else t_vec)
        if ctx.mapped is not None:
            txt = txt + ctx.mapped
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype)) + self.vector_in(ctx.y)
        streams = {"img": self.img_in(img), "txt": self.txt_in(txt), "img_ids": img_ids, "txt_ids": txt_ids}
        if input_hook is not None:
            streams = input_hook(streams)
        return self.forward_tokens(streams["img"], streams["txt"], vec,
                                   torch.cat((streams["txt_ids"], streams["img_ids"]), dim=1), cache, block_hook,
                                   attn_options)

    def forward_tokens(self, img: Tensor, txt: Tensor, vec: Tensor, ids: Tensor, cache: StepCache | None = None,
                       block_hook: BlockHook | None = None, attn_options: dict | None = None) -> Tensor:
        """The transformer blocks and the final layer on embedded tokens.

        Each block runs through ``block_hook(kind, index, block, args)`` when one is given ("double_block" or
        "single_block"; args and result by FLUX's names, see `run_block`): a host's way to let its patches
        replace or wrap single blocks (ComfyUI's ``patches_replace["dit"]``). ``attn_options`` go to the
        attention function of every block run directly.
        """
        pe = self.pe_embedder(ids)
        call = block_hook or (lambda kind, index, block, args: run_block(block, args, attn_options))
        after_first = None
        for index, block in enumerate(self.double_blocks):
            out = call("double_block", index, block, {"img": img, "txt": txt, "vec": vec, "pe": pe})
            if index == 0 and cache is not None:
                cached = cache.lookup(out["img"] - img)
                if cached is not None:
                    return self.final_layer(out["img"] + cached, vec)
                after_first = out["img"]
            img, txt = out["img"], out["txt"]
        x = torch.cat((txt, img), dim=1)
        for index, block in enumerate(self.single_blocks):
            x = call("single_block", index, block, {"img": x, "vec": vec, "pe": pe})["img"]
        img = x[:, txt.shape[1]:]
        if after_first is not None:
            cache.store(img - after_first)
        return self.final_layer(img, vec)


# One block's inputs and outputs by FLUX's names (what ComfyUI's block patches read and return): a double
# block takes img, txt, vec, pe and gives img, txt; a single block takes the joint [txt | img] sequence as
# img, with vec and pe, and gives img.
BlockArgs = dict[str, Tensor]
BlockHook = Callable[[str, int, nn.Module, BlockArgs], BlockArgs]
# The embedded streams before the blocks, by FLUX's names: img, txt (tokens) and img_ids, txt_ids (RoPE ids).
InputHook = Callable[[dict[str, Tensor]], dict[str, Tensor]]


def run_block(block: nn.Module, args: BlockArgs, attn_options: dict | None = None) -> BlockArgs:
    """Run one transformer block on its named inputs; returns its named outputs."""
    if isinstance(block, DoubleStreamBlock):
        img, txt = block(args["img"], args["txt"], args["vec"], args["pe"], attn_options)
        return {"img": img, "txt": txt}
    return {"img": block(args["img"], args["vec"], args["pe"], attn_options)}


class StepCache:
    """First-block cache across denoising steps (lossy, off by default).

    Each step runs the first double block; when its image-token residual changed by less than
    `threshold` (relative mean absolute difference) since the last fully computed step, the
    remaining blocks' contribution from that step is reused instead of recomputed. Use one
    instance per edit.
    """

    def __init__(self, threshold: float):
        if threshold <= 0:
            raise ValueError(f"step cache threshold must be > 0, got {threshold}")
        self.threshold = threshold
        self.reference: Tensor | None = None  # first-block residual of the last full step
        self.remainder: Tensor | None = None  # what the other blocks added at that step
        self.hits = 0
        self.misses = 0

    def lookup(self, first_residual: Tensor) -> Tensor | None:
        if self.reference is not None and self.reference.shape == first_residual.shape:
            change = (first_residual - self.reference).abs().mean() / self.reference.abs().mean().clamp_min(1e-12)
            if float(change) < self.threshold:
                self.hits += 1
                return self.remainder
        self.misses += 1
        self.reference = first_residual
        return None

    def store(self, remainder: Tensor) -> None:
        self.remainder = remainder
