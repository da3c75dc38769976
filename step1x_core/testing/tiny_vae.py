"""A tiny random autoencoder in the FLUX.1 ``ae.safetensors`` key layout, for tests and smoke runs."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..vae.model import AutoEncoder
from ..vae.params import SCALE_FACTOR, SHIFT_FACTOR, AutoEncoderParams

# Weights are stored in float16 to keep the file near 1.4 MB; loaders upcast as asked.
TINY_VAE_FILE_DTYPE = torch.float16


def tiny_vae_params() -> AutoEncoderParams:
    """Two levels (so latents are H/2), one resnet per level, the real 16 latent channels.

    Widths 32 and 64 keep GroupNorm(32) valid and give level 1 a ``nin_shortcut``.
    """
    return AutoEncoderParams(
        resolution=256,
        in_channels=3,
        ch=32,
        out_ch=3,
        ch_mult=(1, 2),
        num_res_blocks=1,
        z_channels=16,
        scale_factor=SCALE_FACTOR,
        shift_factor=SHIFT_FACTOR,
    )


def tiny_vae_state_dict(seed: int = 0, params: AutoEncoderParams | None = None) -> dict[str, Tensor]:
    """Deterministic float32 weights for ``AutoEncoder(params)`` (tiny params by default)."""
    params = tiny_vae_params() if params is None else params
    skeleton = AutoEncoder(params, device="meta")
    generator = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> Tensor:
        return torch.randn(shape, generator=generator)

    state_dict: dict[str, Tensor] = {}
    for module_name, module in skeleton.named_modules():
        if isinstance(module, nn.Conv2d):
            # Unit-variance activations through the conv (fan-in scaling), small biases.
            fan_in = module.weight[0].numel()
            state_dict[f"{module_name}.weight"] = randn(module.weight.shape) / fan_in**0.5
            state_dict[f"{module_name}.bias"] = 0.02 * randn(module.bias.shape)
        elif isinstance(module, nn.GroupNorm):
            # Near-identity affine, perturbed so a wrong weight/bias mapping shows up in tests.
            state_dict[f"{module_name}.weight"] = 1.0 + 0.1 * randn(module.weight.shape)
            state_dict[f"{module_name}.bias"] = 0.1 * randn(module.bias.shape)
    missing = set(skeleton.state_dict()) - set(state_dict)
    if missing:  # a new layer type would otherwise be silently left out of the file
        raise RuntimeError(f"tiny VAE generator does not cover {sorted(missing)}")
    return state_dict


def write_tiny_vae(path: Path, seed: int = 0) -> Path:
    """Write the tiny AE as safetensors (float16, < 2 MB) and return ``path``."""
    path = Path(path)
    tensors = {key: value.to(TINY_VAE_FILE_DTYPE).contiguous() for key, value in tiny_vae_state_dict(seed).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
