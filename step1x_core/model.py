"""The Step1X-Edit DiT: connector + FLUX-shaped MMDiT without guidance embedding.

The forward takes packed tokens only (patchify, ids, schedule and the Euler loop live in
`sampling.py`). Image tokens are [target | reference]; the output covers all of them and the caller
keeps the target part.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import AttentionFn, default_attention
from .config import DiTParams
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
        self.connector = Qwen2Connector(params.connector, **factory)

    def set_attention(self, attn_fn: AttentionFn) -> None:
        """Swap the attention backend of every block (e.g. ComfyUI's optimized attention)."""
        for block in [*self.double_blocks, *self.single_blocks]:
            block.attn_fn = attn_fn

    def forward(self, img: Tensor, img_ids: Tensor, txt_ids: Tensor, timesteps: Tensor,
                llm_embedding: Tensor, t_vec: Tensor, mask: Tensor) -> Tensor:
        """The official signature: runs the connector on the Qwen-VL embeddings, then the DiT."""
        return self.forward_context(img, img_ids, txt_ids, timesteps, self.connector.precompute(llm_embedding, mask),
                                    t_vec)

    def forward_context(self, img: Tensor, img_ids: Tensor, txt_ids: Tensor, timesteps: Tensor,
                        ctx: ConnectorContext, t_vec: Tensor | None = None) -> Tensor:
        """The DiT with the connector's t-independent part already computed (once per edit).

        img [B, L_img, in_channels], img_ids [B, L_img, 3], txt_ids [B, L_txt, 3], timesteps [B] in
        [0, 1]; t_vec (the connector's t) defaults to timesteps. Returns [B, L_img, out_channels].
        """
        if img.ndim != 3:
            raise ValueError(f"img must be packed tokens [B, L, {self.params.in_channels}], got shape {tuple(img.shape)}")
        txt = self.connector.refine(ctx, timesteps if t_vec is None else t_vec)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype)) + self.vector_in(ctx.y)
        return self.forward_tokens(self.img_in(img), self.txt_in(txt), vec, torch.cat((txt_ids, img_ids), dim=1))

    def forward_tokens(self, img: Tensor, txt: Tensor, vec: Tensor, ids: Tensor) -> Tensor:
        pe = self.pe_embedder(ids)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)
