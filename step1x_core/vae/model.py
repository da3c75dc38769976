"""The FLUX.1 autoencoder (AE) that Step1X-Edit uses to move images to and from latent space.

Architecture and checkpoint layout follow black-forest-labs/flux ``src/flux/modules/autoencoder.py``
(Apache-2.0), which Step1X-Edit ships unchanged. Module attribute names are the keys of BFL's
single-file ``ae.safetensors`` (``encoder.down.0.block.1.conv2.weight`` ...), so a real file loads
with ``load_state_dict(strict=True)`` and no renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import DecoderLevel, EncoderLevel, MidBlock, Operations, group_norm
from .params import FLUX_AE_PARAMS, AutoEncoderParams


class Encoder(nn.Module):
    """Image ``[B, in_channels, H, W]`` to posterior moments ``[B, 2*z_channels, H/f, W/f]`` (mean, logvar)."""

    def __init__(
        self, params: AutoEncoderParams, dtype=None, device=None, operations: Operations = nn
    ) -> None:
        super().__init__()
        layer = dict(dtype=dtype, device=device, operations=operations, groups=params.norm_groups)
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
        self.norm_out = group_norm(widths[-1], dtype, device, operations, params.norm_groups)
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
        layer = dict(dtype=dtype, device=device, operations=operations, groups=params.norm_groups)
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
        self.norm_out = group_norm(widths[0], dtype, device, operations, params.norm_groups)
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

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of the posterior of an image in [-1, 1], as diffusers' DiagonalGaussianDistribution
        (log-variance clamped to [-30, 20]); the v1.2 reference samples from it."""
        _check_channels("image", x, self.params.in_channels)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))

    def normalise(self, latent: Tensor) -> Tensor:
        """A raw latent (a posterior sample or mean) in the DiT's normalised latent space."""
        return (latent - self.params.shift_factor) * self.params.scale_factor

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latent ``[B, z_channels, h, w]`` -> image ``[B, out_ch, h*f, w*f]`` (roughly [-1, 1])."""
        _check_channels("latent", z, self.params.z_channels)
        return self.decoder(z / self.params.scale_factor + self.params.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def _check_channels(what: str, x: Tensor, channels: int) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"expected {what} of shape [B, {channels}, H, W], got {tuple(x.shape)}")
