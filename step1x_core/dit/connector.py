"""The Qwen2Connector: Qwen-VL hidden states -> DiT text tokens and the pooled vector y.

A HunyuanVideo-style single-token refiner (timestep-aware, masked self-attention) plus a global
masked-mean projection. Attribute names equal the `connector.*` checkpoint keys.

Only the refiner depends on t. `precompute` does the rest once per edit; `refine` runs per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .params import ConnectorParams
from .layers import timestep_embedding


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the valid tokens: x [B, L, C], mask [B, L] of 0/1."""
    # The count stays an integer tensor: a bf16 sum of ones is inexact above 256 tokens.
    weights = mask.unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1)


def pairwise_attention_mask(mask: Tensor) -> Tensor:
    """[B, L] -> boolean [B, 1, L, L]: token i sees j when both are valid; column 0 is always on
    so that padding queries never have an all-False row (they attend to token 0 only)."""
    valid = mask.bool()
    pairwise = valid[:, None, :, None] & valid[:, None, None, :]
    pairwise[:, :, :, 0] = True
    return pairwise


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_size: int = 256, dtype=None, device=None, operations=nn):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            operations.Linear(frequency_size, hidden_size, bias=True, dtype=dtype, device=device),
            nn.SiLU(),
            operations.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device),
        )

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        # The connector scales t by 1000 itself (time_factor here is 1).
        return self.mlp(timestep_embedding(t, self.frequency_size, time_factor=1.0).to(dtype))


class TextProjection(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.linear_1 = operations.Linear(in_channels, hidden_size, bias=True, dtype=dtype, device=device)
        self.act_1 = nn.SiLU()
        self.linear_2 = operations.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class RefinerMLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.fc1 = operations.Linear(hidden_size, mlp_hidden, bias=True, dtype=dtype, device=device)
        self.act = nn.SiLU()
        self.fc2 = operations.Linear(mlp_hidden, hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class IndividualTokenRefinerBlock(nn.Module):
    """Gated (no shift/scale) pre-norm self-attention + MLP, gates from the conditioning c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = operations.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6, dtype=dtype, device=device)
        self.self_attn_qkv = operations.Linear(hidden_size, hidden_size * 3, bias=True, dtype=dtype, device=device)
        self.self_attn_proj = operations.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device)
        self.norm2 = operations.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6, dtype=dtype, device=device)
        self.mlp = RefinerMLP(hidden_size, mlp_hidden, dtype=dtype, device=device, operations=operations)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), operations.Linear(hidden_size, 2 * hidden_size, bias=True, dtype=dtype, device=device))

    def forward(self, x: Tensor, c: Tensor, attn_mask: Tensor) -> Tensor:
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=1)
        q, k, v = rearrange(self.self_attn_qkv(self.norm1(x)), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + gate_msa.unsqueeze(1) * self.self_attn_proj(rearrange(attn, "B H L D -> B L (H D)"))
        return x + gate_mlp.unsqueeze(1) * self.mlp(self.norm2(x))


class IndividualTokenRefiner(nn.Module):
    def __init__(self, params: ConnectorParams, dtype=None, device=None, operations=nn):
        super().__init__()
        self.blocks = nn.ModuleList(
            IndividualTokenRefinerBlock(params.hidden_size, params.num_heads, params.mlp_hidden,
                                        dtype=dtype, device=device, operations=operations)
            for _ in range(params.depth)
        )

    def forward(self, x: Tensor, c: Tensor, attn_mask: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, c, attn_mask)
        return x


class SingleTokenRefiner(nn.Module):
    def __init__(self, params: ConnectorParams, dtype=None, device=None, operations=nn):
        super().__init__()
        factory = dict(dtype=dtype, device=device, operations=operations)
        self.input_embedder = operations.Linear(params.in_channels, params.hidden_size, bias=True,
                                                dtype=dtype, device=device)
        self.t_embedder = TimestepEmbedder(params.hidden_size, **factory)
        self.c_embedder = TextProjection(params.in_channels, params.hidden_size, **factory)
        self.individual_token_refiner = IndividualTokenRefiner(params, **factory)


@dataclass
class ConnectorContext:
    """Everything the connector computes that does not depend on t (once per edit)."""

    tokens: Tensor  # input_embedder(x) [B, L, hidden]
    context: Tensor  # c_embedder(masked mean of x) [B, hidden]
    attn_mask: Tensor  # pairwise boolean mask [B, 1, L, L]
    y: Tensor  # pooled vector for the DiT's vector_in [B, pooled_dim]
    mapped: Tensor | None = None  # v1.2: text_token_mapping of the quoted characters [B, L, hidden], added per step

    def _each(self, change) -> ConnectorContext:
        return ConnectorContext(change(self.tokens), change(self.context), change(self.attn_mask), change(self.y),
                                None if self.mapped is None else change(self.mapped))

    def select(self, index: int) -> ConnectorContext:
        """The context of one batch entry (e.g. the conditional one of [cond, uncond])."""
        return self._each(lambda t: t[index:index + 1])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ConnectorContext:
        return self._each(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))


class Qwen2Connector(nn.Module):
    def __init__(self, params: ConnectorParams, scale_factor: bool, dtype=None, device=None, operations=nn):
        """``scale_factor``: the v1.0 parameter that scales the pooled mean (``Version.has_connector_scale_factor``)."""
        super().__init__()
        self.params = params
        self.has_scale_factor = scale_factor
        self.S = SingleTokenRefiner(params, dtype=dtype, device=device, operations=operations)
        self.global_proj_out = operations.Linear(params.in_channels, params.pooled_dim, dtype=dtype, device=device)
        if scale_factor:
            self.scale_factor = nn.Parameter(torch.empty(1, dtype=dtype, device=device))

    def precompute(self, x: Tensor, mask: Tensor) -> ConnectorContext:
        """x: Qwen-VL embeddings [B, L, in_channels]; mask: [B, L] of 0/1."""
        mean = masked_mean(x, mask)
        pooled = mean
        if self.has_scale_factor:
            pooled = mean * (1 + self.scale_factor.to(device=x.device, dtype=x.dtype))
        return ConnectorContext(
            tokens=self.S.input_embedder(x),
            context=self.S.c_embedder(mean),
            attn_mask=pairwise_attention_mask(mask.to(x.device)),
            y=self.global_proj_out(pooled),
        )

    def refine(self, ctx: ConnectorContext, t: Tensor) -> Tensor:
        """Text tokens for the DiT at time t in [0, 1] ([B] tensor): [B, L, hidden]."""
        c = self.S.t_embedder(t * 1000, dtype=ctx.context.dtype) + ctx.context
        return self.S.individual_token_refiner(ctx.tokens, c, ctx.attn_mask)

    def forward(self, x: Tensor, t: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        ctx = self.precompute(x, mask)
        return self.refine(ctx, t), ctx.y
