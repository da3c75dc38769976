"""The FLUX.1 autoencoder (AE) that Step1X-Edit uses to move images to and from latent space.

Architecture and checkpoint layout follow black-forest-labs/flux ``src/flux/modules/autoencoder.py``
(Apache-2.0), which Step1X-Edit ships unchanged. Module attribute names are the keys of BFL's
single-file ``ae.safetensors`` (``encoder.down.0.block.1.conv2.weight`` ...), so a real file loads
with ``load_state_dict(strict=True)`` and no renaming.

Every layer takes ``dtype``, ``device`` and ``operations`` (a namespace with ``Conv2d`` and
``GroupNorm``, ``torch.nn`` by default) so ComfyUI can inject its ``comfy.ops`` classes.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..dit.checkpoint import describe_unreadable
from ..dit.params import LATENT_CHANNELS

logger = logging.getLogger(__name__)

SCALE_FACTOR = 0.3611
SHIFT_FACTOR = 0.1159

# GroupNorm settings shared by every norm in the AE.
NORM_GROUPS = 32
NORM_EPS = 1e-6

FLUX_LATENT_CHANNELS = LATENT_CHANNELS  # what the DiT's patch embedding expects

Operations = Any  # a namespace such as torch.nn or comfy.ops.manual_cast


@dataclass(frozen=True)
class AutoEncoderParams:
    """Hyperparameters of a FLUX-style AE; validated on construction.

    ``resolution`` only records the training resolution (it names no weight and does not limit
    input sizes). ``ch`` (hence every width ``ch * m``) must be divisible by the 32 GroupNorm groups.
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

    def __post_init__(self) -> None:
        # Accept any sequence for ch_mult but store a tuple so the dataclass stays hashable.
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        for name in ("resolution", "in_channels", "ch", "out_ch", "num_res_blocks", "z_channels"):
            _require_positive_int(name, getattr(self, name))
        if not self.ch_mult:
            raise ValueError("ch_mult must name at least one level, got ()")
        for level, mult in enumerate(self.ch_mult):
            _require_positive_int(f"ch_mult[{level}]", mult)
        # Every width is ch * int, so checking ch covers all GroupNorm layers.
        if self.ch % NORM_GROUPS:
            raise ValueError(f"ch = {self.ch} is not divisible by the {NORM_GROUPS} GroupNorm groups")
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
    z_channels=FLUX_LATENT_CHANNELS,
    scale_factor=SCALE_FACTOR,
    shift_factor=SHIFT_FACTOR,
)


# --------------------------------------------------------------------------- layers


def _group_norm(channels: int, dtype, device, operations: Operations) -> nn.Module:
    return operations.GroupNorm(
        num_groups=NORM_GROUPS, num_channels=channels, eps=NORM_EPS, affine=True, dtype=dtype, device=device
    )


class ResnetBlock(nn.Module):
    """Two norm-swish-conv3x3 stages plus a skip; a 1x1 ``nin_shortcut`` only where the width changes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dtype=None,
        device=None,
        operations: Operations = nn,
    ) -> None:
        super().__init__()
        conv = dict(dtype=dtype, device=device)
        self.norm1 = _group_norm(in_channels, dtype, device, operations)
        self.conv1 = operations.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, **conv)
        self.norm2 = _group_norm(out_channels, dtype, device, operations)
        self.conv2 = operations.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, **conv)
        self.nin_shortcut = (
            operations.Conv2d(in_channels, out_channels, kernel_size=1, **conv)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections and a residual."""

    def __init__(self, channels: int, dtype=None, device=None, operations: Operations = nn) -> None:
        super().__init__()
        conv = dict(kernel_size=1, dtype=dtype, device=device)
        self.norm = _group_norm(channels, dtype, device, operations)
        self.q = operations.Conv2d(channels, channels, **conv)
        self.k = operations.Conv2d(channels, channels, **conv)
        self.v = operations.Conv2d(channels, channels, **conv)
        self.proj_out = operations.Conv2d(channels, channels, **conv)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        normed = self.norm(x)
        # One head whose width is the channel count, so SDPA scales by 1/sqrt(channels).
        q, k, v = (rearrange(proj(normed), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = rearrange(attended, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv after padding only the right and bottom edges."""

    # (left, right, top, bottom): torch convs pad symmetrically, the checkpoint was trained with this.
    PADDING = (0, 1, 0, 1)

    def __init__(self, channels: int, dtype=None, device=None, operations: Operations = nn) -> None:
        super().__init__()
        self.conv = operations.Conv2d(
            channels, channels, kernel_size=3, stride=2, padding=0, dtype=dtype, device=device
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.PADDING, mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the resolution by nearest-neighbour repetition, then smooth with a 3x3 conv."""

    def __init__(self, channels: int, dtype=None, device=None, operations: Operations = nn) -> None:
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, kernel_size=3, padding=1, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """Lowest-resolution stage shared by encoder and decoder: resnet, attention, resnet."""

    def __init__(self, channels: int, dtype=None, device=None, operations: Operations = nn) -> None:
        super().__init__()
        layer = dict(dtype=dtype, device=device, operations=operations)
        self.block_1 = ResnetBlock(channels, channels, **layer)
        self.attn_1 = AttnBlock(channels, **layer)
        self.block_2 = ResnetBlock(channels, channels, **layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderLevel(nn.Module):
    """One encoder resolution: ``block`` resnets, then an optional ``downsample``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        downsample: bool,
        dtype=None,
        device=None,
        operations: Operations = nn,
    ) -> None:
        super().__init__()
        layer = dict(dtype=dtype, device=device, operations=operations)
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, **layer) for a, b in zip(widths, widths[1:]))
        self.downsample = Downsample(out_channels, **layer) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(nn.Module):
    """One decoder resolution: ``block`` resnets, then an optional ``upsample``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        upsample: bool,
        dtype=None,
        device=None,
        operations: Operations = nn,
    ) -> None:
        super().__init__()
        layer = dict(dtype=dtype, device=device, operations=operations)
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, **layer) for a, b in zip(widths, widths[1:]))
        self.upsample = Upsample(out_channels, **layer) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Image ``[B, in_channels, H, W]`` to posterior moments ``[B, 2*z_channels, H/f, W/f]`` (mean, logvar)."""

    def __init__(
        self, params: AutoEncoderParams, dtype=None, device=None, operations: Operations = nn
    ) -> None:
        super().__init__()
        layer = dict(dtype=dtype, device=device, operations=operations)
        widths = params.level_channels
        last = len(widths) - 1
        self.conv_in = operations.Conv2d(
            params.in_channels, params.ch, kernel_size=3, padding=1, dtype=dtype, device=device
        )
        level_inputs = (params.ch,) + widths[:-1]
        self.down = nn.ModuleList(
            EncoderLevel(width_in, width, params.num_res_blocks, downsample=level != last, **layer)
            for level, (width_in, width) in enumerate(zip(level_inputs, widths))
        )
        self.mid = MidBlock(widths[-1], **layer)
        self.norm_out = _group_norm(widths[-1], dtype, device, operations)
        self.conv_out = operations.Conv2d(
            widths[-1], 2 * params.z_channels, kernel_size=3, padding=1, dtype=dtype, device=device
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` to image ``[B, out_ch, h*f, w*f]``; one more resnet per level than the encoder."""

    def __init__(
        self, params: AutoEncoderParams, dtype=None, device=None, operations: Operations = nn
    ) -> None:
        super().__init__()
        layer = dict(dtype=dtype, device=device, operations=operations)
        widths = params.level_channels
        self.conv_in = operations.Conv2d(
            params.z_channels, widths[-1], kernel_size=3, padding=1, dtype=dtype, device=device
        )
        self.mid = MidBlock(widths[-1], **layer)
        # ``up[i]`` works at the resolution of encoder level i and is fed by level i+1 (coarser).
        level_inputs = widths[1:] + widths[-1:]
        self.up = nn.ModuleList(
            DecoderLevel(width_in, width, params.num_res_blocks + 1, upsample=level != 0, **layer)
            for level, (width_in, width) in enumerate(zip(level_inputs, widths))
        )
        self.norm_out = _group_norm(widths[0], dtype, device, operations)
        self.conv_out = operations.Conv2d(
            widths[0], params.out_ch, kernel_size=3, padding=1, dtype=dtype, device=device
        )

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # coarsest first
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """The FLUX.1 AE with Step1X-Edit's latent normalisation.

    ``encode`` returns ``scale_factor * (posterior_mean - shift_factor)``. The official code draws a
    sample ``mean + std * randn`` from the posterior (with the global, unseeded RNG); we use the
    mean, which makes encoding deterministic. The AE's posterior std is tiny, so this is a harmless,
    documented simplification. ``decode`` inverts the normalisation and runs the decoder.
    Images are in ``[-1, 1]``; H and W should be multiples of ``params.downscale_factor``.
    """

    def __init__(
        self,
        params: AutoEncoderParams = FLUX_AE_PARAMS,
        dtype=None,
        device=None,
        operations: Operations = nn,
    ) -> None:
        super().__init__()
        self.params = params
        self.encoder = Encoder(params, dtype=dtype, device=device, operations=operations)
        self.decoder = Decoder(params, dtype=dtype, device=device, operations=operations)

    def encode(self, x: Tensor) -> Tensor:
        """Image ``[B, in_channels, H, W]`` in [-1, 1] -> normalised latent ``[B, z_channels, H/f, W/f]``."""
        _check_channels("image", x, self.params.in_channels)
        mean, _logvar = self.encoder(x).chunk(2, dim=1)
        return self.params.scale_factor * (mean - self.params.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latent ``[B, z_channels, h, w]`` -> image ``[B, out_ch, h*f, w*f]`` (roughly [-1, 1])."""
        _check_channels("latent", z, self.params.z_channels)
        return self.decoder(z / self.params.scale_factor + self.params.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def _check_channels(what: str, x: Tensor, channels: int) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"expected {what} of shape [B, {channels}, H, W], got {tuple(x.shape)}")


# --------------------------------------------------------------------------- config detection

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
    return _params_from_shapes({key: tuple(tensor.shape) for key, tensor in state_dict.items()})


def _params_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> AutoEncoderParams:
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
    )


# --------------------------------------------------------------------------- loading


class VAEFileError(ValueError):
    """A VAE file is missing, unreadable, or not the FLUX.1 ``ae.safetensors``."""


_NEEDED = f"Step1X-Edit needs the FLUX.1 ae.safetensors VAE ({FLUX_LATENT_CHANNELS} latent channels)"

# Key fragments that identify other checkpoints people commonly pick by mistake.
_FOREIGN_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("double_blocks.", "diffusion-transformer (DiT) weights ('double_blocks.*')"),
    ("single_blocks.", "diffusion-transformer (DiT) weights ('single_blocks.*')"),
    ("transformer_blocks.", "diffusers transformer weights ('transformer_blocks.*')"),
    ("model.diffusion_model.", "a full diffusion checkpoint ('model.diffusion_model.*')"),
    ("first_stage_model.", "a full checkpoint with the VAE under 'first_stage_model.'"),
    ("language_model.", "language-model weights ('language_model.*')"),
)


def load_vae(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoEncoder:
    """Load a FLUX.1 ``ae.safetensors`` (any size of the same layout) as an eval-mode ``AutoEncoder``.

    The model is built on the ``meta`` device and the memory-mapped tensors are assigned to it, so
    no random init runs and, when ``dtype`` matches the file, no second copy of the weights is made.
    Raises ``VAEFileError`` for a missing, non-safetensors, unreadable or non-FLUX-AE file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise VAEFileError(
            f"{path.name}: only .safetensors VAE files are loaded (pickled .ckpt/.pt/.bin files can run "
            f"arbitrary code); {_NEEDED}"
        )
    if not path.is_file():
        raise VAEFileError(f"VAE file not found: {path}")

    try:
        handle = safe_open(str(path), framework="pt", device=str(device))
    except (SafetensorError, OSError) as err:
        raise VAEFileError(
            f"{path.name} cannot be read as safetensors ({err}); {describe_unreadable(path)}"
        ) from err
    with handle as weights:
        shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
        params = _flux_params_or_error(path.name, shapes)
        state_dict = {key: weights.get_tensor(key).to(dtype=dtype) for key in shapes}

    model = AutoEncoder(params, dtype=dtype, device="meta")
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise VAEFileError(
            f"{path.name}: keys do not match a FLUX AE with {params}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; {_NEEDED}"
        )
    model.eval().requires_grad_(False)
    logger.info(
        "Loaded FLUX VAE %s: ch=%d ch_mult=%s num_res_blocks=%d z_channels=%d, %s on %s",
        path.name,
        params.ch,
        list(params.ch_mult),
        params.num_res_blocks,
        params.z_channels,
        dtype,
        device,
    )
    return model


def _flux_params_or_error(file_name: str, shapes: Mapping[str, tuple[int, ...]]) -> AutoEncoderParams:
    """Return the AE params, or raise a VAEFileError that says what the file holds instead."""
    if not shapes:
        raise VAEFileError(f"{file_name} holds no tensors; {_NEEDED}")
    if any(".down_blocks." in key or ".mid_block." in key for key in shapes):
        raise VAEFileError(
            f"{file_name}: diffusers AutoencoderKL layout found ('encoder.down_blocks.*'); "
            f"use the single-file FLUX.1 ae.safetensors instead"
        )
    if "encoder.conv_in.weight" not in shapes:
        found = next(
            (what for marker, what in _FOREIGN_LAYOUTS if any(marker in key for key in shapes)),
            f"{len(shapes)} tensors such as {sorted(shapes)[:3]}",
        )
        raise VAEFileError(f"{file_name} is not a VAE (no 'encoder.conv_in.weight'): found {found}; {_NEEDED}")
    if "quant_conv.weight" in shapes or "post_quant_conv.weight" in shapes:
        z_channels = shapes.get("decoder.conv_in.weight", (None, "?"))[1]
        raise VAEFileError(
            f"{file_name} is an SD1.x/SDXL-style VAE ({z_channels} latent channels, quant_conv layers); "
            f"{_NEEDED}"
        )
    try:
        params = _params_from_shapes(shapes)
    except ValueError as err:
        raise VAEFileError(f"{file_name} does not have the FLUX AE layout: {err}; {_NEEDED}") from err
    if params.z_channels != FLUX_LATENT_CHANNELS:
        raise VAEFileError(f"{file_name} is a VAE with {params.z_channels} latent channels; {_NEEDED}")
    return params
