"""The FLUX.1 autoencoder's hyperparameters: the released values, validation, and reading them from a file's
tensor shapes."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

# Channels of the latent the DiT denoises (packed 2x2 into its 64 input channels).
LATENT_CHANNELS = 16
SCALE_FACTOR = 0.3611
SHIFT_FACTOR = 0.1159

# GroupNorm settings shared by every norm in the AE.
NORM_GROUPS = 32
NORM_EPS = 1e-6


@dataclass(frozen=True)
class AutoEncoderParams:
    """Hyperparameters of a FLUX-style AE; validated on construction.

    ``resolution`` only records the training resolution (it names no weight and does not limit
    input sizes). ``ch`` (hence every width ``ch * m``) must be divisible by the GroupNorm groups (32 in
    FLUX's AE; a diffusers config's ``norm_num_groups`` says otherwise, which no shape shows).
    """

    resolution: int
    in_channels: int
    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    scale_factor: float
    shift_factor: float
    norm_groups: int = NORM_GROUPS

    def __post_init__(self) -> None:
        # Accept any sequence for ch_mult but store a tuple so the dataclass stays hashable.
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        for name in ("resolution", "in_channels", "ch", "out_ch", "num_res_blocks", "z_channels", "norm_groups"):
            _require_positive_int(name, getattr(self, name))
        if not self.ch_mult:
            raise ValueError("ch_mult must name at least one level, got ()")
        for level, mult in enumerate(self.ch_mult):
            _require_positive_int(f"ch_mult[{level}]", mult)
        # Every width is ch * int, so checking ch covers all GroupNorm layers.
        if self.ch % self.norm_groups:
            raise ValueError(f"ch = {self.ch} is not divisible by the {self.norm_groups} GroupNorm groups")
        if not (math.isfinite(self.scale_factor) and self.scale_factor > 0):
            raise ValueError(f"scale_factor must be a positive finite number, got {self.scale_factor!r}")
        if not math.isfinite(self.shift_factor):
            raise ValueError(f"shift_factor must be finite, got {self.shift_factor!r}")

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channel width of each resolution level, finest first."""
        return tuple(self.ch * mult for mult in self.ch_mult)

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each side: one stride-2 downsample between levels."""
        return 2 ** (len(self.ch_mult) - 1)


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


FLUX_AE_PARAMS = AutoEncoderParams(
    resolution=256,
    in_channels=3,
    ch=128,
    out_ch=3,
    ch_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    z_channels=LATENT_CHANNELS,
    scale_factor=SCALE_FACTOR,
    shift_factor=SHIFT_FACTOR,
)


_ENCODER_BLOCK_KEY = re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.conv1\.weight$")
_REQUIRED_KEYS = (
    "encoder.conv_in.weight",
    "encoder.conv_out.weight",
    "decoder.conv_in.weight",
    "decoder.conv_out.weight",
)


def params_from_state_dict(state_dict: Mapping[str, Tensor]) -> AutoEncoderParams:
    """Infer the AE configuration from key names and tensor shapes (meta tensors are fine).

    ``scale_factor``/``shift_factor``/``resolution`` are not stored in the file; the FLUX values are used.
    Raises ``ValueError`` when the keys do not describe a FLUX-layout AE.
    """
    return params_from_shapes({key: tuple(tensor.shape) for key, tensor in state_dict.items()})


def params_from_shapes(shapes: Mapping[str, tuple[int, ...]], norm_groups: int = NORM_GROUPS) -> AutoEncoderParams:
    missing = [key for key in _REQUIRED_KEYS if key not in shapes]
    if missing:
        raise ValueError(f"not a FLUX AE state dict: missing {missing}")
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    z_channels = shapes["decoder.conv_in.weight"][1]
    out_ch = shapes["decoder.conv_out.weight"][0]

    blocks_per_level: dict[int, int] = {}
    for key in shapes:
        match = _ENCODER_BLOCK_KEY.match(key)
        if match:
            level, block = int(match[1]), int(match[2])
            blocks_per_level[level] = max(blocks_per_level.get(level, 0), block + 1)
    num_levels = len(blocks_per_level)
    if sorted(blocks_per_level) != list(range(num_levels)) or num_levels == 0:
        raise ValueError(f"encoder levels must be numbered 0..n-1, found {sorted(blocks_per_level)}")
    block_counts = set(blocks_per_level.values())
    if len(block_counts) != 1:
        raise ValueError(f"encoder levels have different block counts: {blocks_per_level}")

    ch_mult = []
    for level in range(num_levels):
        width = shapes[f"encoder.down.{level}.block.0.conv1.weight"][0]
        if width % ch:
            raise ValueError(f"encoder level {level} has width {width}, not a multiple of ch={ch}")
        ch_mult.append(width // ch)

    moments = shapes["encoder.conv_out.weight"][0]
    if moments != 2 * z_channels:
        raise ValueError(
            f"encoder emits {moments} channels but the decoder takes {z_channels}; "
            f"expected 2 * z_channels (mean and logvar)"
        )
    return AutoEncoderParams(
        resolution=FLUX_AE_PARAMS.resolution,
        in_channels=in_channels,
        ch=ch,
        out_ch=out_ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=block_counts.pop(),
        z_channels=z_channels,
        scale_factor=SCALE_FACTOR,
        shift_factor=SHIFT_FACTOR,
        norm_groups=norm_groups,
    )
