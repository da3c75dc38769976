"""Hyperparameters of the Step1X-Edit DiT and its connector, validated on construction.

The released model is `STEP1X_EDIT_PARAMS`; tiny test models use the same classes with smaller
numbers. `checkpoint.py` infers these from a state dict's keys and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..versions import Version



def _require_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be > 0, got {value}")


@dataclass(frozen=True)
class ConnectorParams:
    """The Qwen2Connector: refines Qwen-VL hidden states into DiT text tokens and a pooled vector."""

    in_channels: int = 3584  # Qwen2.5-VL-7B hidden size
    hidden_size: int = 4096
    num_heads: int = 32
    depth: int = 2
    mlp_ratio: float = 4.0
    pooled_dim: int = 768

    def __post_init__(self) -> None:
        _require_positive(self, "in_channels", "hidden_size", "num_heads", "depth", "pooled_dim")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"connector hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class DiTParams:
    """The FLUX-shaped MMDiT (no guidance embedding) plus its connector and checkpoint version."""

    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    version: Version = Version.V1_0  # a plain string such as "v1.1" is accepted and converted
    connector: ConnectorParams = field(default_factory=ConnectorParams)

    def __post_init__(self) -> None:
        _require_positive(
            self, "in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads"
        )
        if self.depth < 0 or self.depth_single_blocks < 0:
            raise ValueError(f"block counts must be >= 0, got {self.depth} double, {self.depth_single_blocks} single")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"RoPE axes_dim {list(self.axes_dim)} must sum to the head dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"RoPE axes_dim {list(self.axes_dim)} must all be even")
        object.__setattr__(self, "version", Version.parse(self.version))
        if self.context_in_dim != self.connector.hidden_size:
            raise ValueError(
                f"context_in_dim {self.context_in_dim} must equal the connector hidden size "
                f"{self.connector.hidden_size}"
            )
        if self.vec_in_dim != self.connector.pooled_dim:
            raise ValueError(
                f"vec_in_dim {self.vec_in_dim} must equal the connector pooled dim {self.connector.pooled_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def with_version(self, version: Version | str) -> DiTParams:
        """The same shapes under another version (v1.1 drops the connector scale_factor)."""
        return replace(self, version=Version.parse(version))


STEP1X_EDIT_PARAMS = DiTParams()
