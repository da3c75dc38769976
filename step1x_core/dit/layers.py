"""Building blocks of the Step1X-Edit DiT. The architecture is FLUX.1's (black-forest-labs/flux),
which ComfyUI's `comfy/ldm/flux/layers.py` also follows; attribute names equal checkpoint keys.

Every layer takes `dtype`, `device` and an `operations` namespace (default `torch.nn`) and creates
its weights through it, so ComfyUI can pass `comfy.ops` classes (fp8 storage, low-VRAM weight
streaming, LoRA patches) and the standalone engine can pass `step1x_core.ops.manual_cast`.
Attention goes through an injected function with ComfyUI's `optimized_attention` convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import AttentionFn, sdpa_attention


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] as [cos, sin] of (time_factor * t) * freqs, float32.

    The multiplication by time_factor happens in t's own dtype (bf16 in the official loop) before
    the float32 sinusoid, as the official code does.
    """
    t = t * time_factor
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices [..., L, dim/2, 2, 2] for one axis; angles in float64, stored float32."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    angles = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)
    out = torch.stack([torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)], dim=-1)
    return rearrange(out, "... n d (i j) -> ... n d i j", i=2, j=2).float()


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, H, L, D] (FLUX layout), in float32."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


class EmbedND(nn.Module):
    """RoPE table for 3-axis position ids [B, L, 3] -> [B, 1, L, head_dim/2, 2, 2]."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        tables = [rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)]
        return torch.cat(tables, dim=-3).unsqueeze(1)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, attn_fn: AttentionFn,
              attn_options: dict | None = None) -> Tensor:
    """RoPE on q and k, then ``attn_fn``; ``attn_options`` are passed to it as they are (a host's per-call
    settings, e.g. ComfyUI's transformer_options, which carry per-model attention overrides)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    return attn_fn(q, k, v, q.shape[1], skip_reshape=True, **(attn_options or {}))


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.in_layer = operations.Linear(in_dim, hidden_dim, bias=True, dtype=dtype, device=device)
        self.silu = nn.SiLU()
        self.out_layer = operations.Linear(hidden_dim, hidden_dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 including the weight (the official Liger "gemma" casting)."""

    def __init__(self, dim: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.scale.to(device=x.device, dtype=torch.float32)
        return F.rms_norm(x.float(), (x.shape[-1],), weight, eps=1e-6).to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.query_norm = RMSNorm(dim, dtype=dtype, device=device, operations=operations)
        self.key_norm = RMSNorm(dim, dtype=dtype, device=device, operations=operations)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds the qkv / norm / proj weights of one stream; the joint attention runs in the block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, dtype=None, device=None, operations=nn):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = operations.Linear(dim, dim * 3, bias=qkv_bias, dtype=dtype, device=device)
        self.norm = QKNorm(dim // num_heads, dtype=dtype, device=device, operations=operations)
        self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, dim] -> normalised q, k and v, each [B, heads, L, head_dim]."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor

    def modulate(self, x: Tensor) -> Tensor:
        return (1 + self.scale) * x + self.shift


class Modulation(nn.Module):
    """adaLN parameters from SiLU(vec): (shift, scale, gate) once or twice (double blocks)."""

    def __init__(self, dim: int, double: bool, dtype=None, device=None, operations=nn):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = operations.Linear(dim, self.multiplier * dim, bias=True, dtype=dtype, device=device)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.multiplier == 6 else None


def _mlp(hidden: int, mlp_hidden: int, dtype, device, operations) -> nn.Sequential:
    return nn.Sequential(
        operations.Linear(hidden, mlp_hidden, bias=True, dtype=dtype, device=device),
        nn.GELU(approximate="tanh"),
        operations.Linear(mlp_hidden, hidden, bias=True, dtype=dtype, device=device),
    )


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one joint attention over [txt, img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 attn_fn: AttentionFn = sdpa_attention, dtype=None, device=None, operations=nn):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.attn_fn = attn_fn
        factory = dict(dtype=dtype, device=device, operations=operations)
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(hidden_size, double=True, **factory))
            setattr(self, f"{stream}_norm1", operations.LayerNorm(
                hidden_size, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device))
            setattr(self, f"{stream}_attn", SelfAttention(hidden_size, num_heads, qkv_bias, **factory))
            setattr(self, f"{stream}_norm2", operations.LayerNorm(
                hidden_size, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device))
            setattr(self, f"{stream}_mlp", _mlp(hidden_size, mlp_hidden, dtype, device, operations))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor,
                attn_options: dict | None = None) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads(img_mod1.modulate(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt_mod1.modulate(self.txt_norm1(txt)))
        attn = attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                         torch.cat((txt_v, img_v), dim=2), pe, self.attn_fn, attn_options)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(img_mod2.modulate(self.img_norm2(img)))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(txt_mod2.modulate(self.txt_norm2(txt)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence (https://arxiv.org/abs/2302.05442)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float,
                 attn_fn: AttentionFn = sdpa_attention, dtype=None, device=None, operations=nn):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.attn_fn = attn_fn
        self.linear1 = operations.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden, dtype=dtype, device=device)
        self.linear2 = operations.Linear(hidden_size + self.mlp_hidden, hidden_size, dtype=dtype, device=device)
        self.norm = QKNorm(hidden_size // num_heads, dtype=dtype, device=device, operations=operations)
        self.pre_norm = operations.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6,
                                             dtype=dtype, device=device)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False, dtype=dtype, device=device, operations=operations)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, attn_options: dict | None = None) -> Tensor:
        mod, _ = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(mod.modulate(self.pre_norm(x))),
                               [3 * self.hidden_size, self.mlp_hidden], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe, self.attn_fn, attn_options)
        return x + mod.gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))


class LastLayer(nn.Module):
    """Non-affine LayerNorm modulated by (shift, scale) from vec, then a linear projection."""

    def __init__(self, hidden_size: int, out_channels: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.norm_final = operations.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6,
                                               dtype=dtype, device=device)
        self.linear = operations.Linear(hidden_size, out_channels, bias=True, dtype=dtype, device=device)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), operations.Linear(hidden_size, 2 * hidden_size, bias=True, dtype=dtype, device=device))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])
