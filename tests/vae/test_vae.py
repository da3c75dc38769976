"""Tests for the FLUX.1 autoencoder: shapes, faithfulness to ComfyUI, config detection and loading."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from step1x_core.testing.tiny_vae import tiny_vae_params, tiny_vae_state_dict, write_tiny_vae
from step1x_core.vae.loader import VAEFileError, load_vae
from step1x_core.vae.model import AutoEncoder
from step1x_core.vae.params import FLUX_AE_PARAMS, SCALE_FACTOR, SHIFT_FACTOR, AutoEncoderParams, params_from_state_dict
from tests.golden_v12 import max_relative
from tests.needs import skip_or_fail
from tests.release_names import VAE


def random_image(height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / VAE)


@pytest.fixture(scope="module")
def tiny_model(tiny_file: Path) -> AutoEncoder:
    return load_vae(tiny_file)


# --------------------------------------------------------------------------- params


def test_flux_params_are_the_published_configuration() -> None:
    assert FLUX_AE_PARAMS.ch == 128 and FLUX_AE_PARAMS.ch_mult == (1, 2, 4, 4)
    assert FLUX_AE_PARAMS.num_res_blocks == 2 and FLUX_AE_PARAMS.z_channels == 16
    assert (FLUX_AE_PARAMS.scale_factor, FLUX_AE_PARAMS.shift_factor) == (0.3611, 0.1159)
    assert (SCALE_FACTOR, SHIFT_FACTOR) == (0.3611, 0.1159)
    assert FLUX_AE_PARAMS.downscale_factor == 8


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"ch": 48}, "48"),
        ({"ch": 16}, "ch = 16 is not divisible by the 32"),
        ({"ch_mult": (1, 0)}, r"ch_mult\[1\]"),
        ({"ch_mult": ()}, "ch_mult"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"z_channels": -1}, "-1"),
        ({"scale_factor": 0.0}, "scale_factor"),
        ({"shift_factor": float("nan")}, "nan"),
    ],
)
def test_params_validation_names_the_bad_value(change: dict, named: str) -> None:
    fields = {**FLUX_AE_PARAMS.__dict__, **change}
    with pytest.raises(ValueError, match=named):
        AutoEncoderParams(**fields)


def test_params_from_state_dict_recovers_real_flux_config_from_meta_tensors() -> None:
    meta_state = AutoEncoder(FLUX_AE_PARAMS, device="meta").state_dict()
    assert len(meta_state) == 244  # the key count of BFL's ae.safetensors
    assert params_from_state_dict(meta_state) == FLUX_AE_PARAMS


def test_params_from_state_dict_recovers_tiny_config_from_file(tiny_file: Path) -> None:
    from safetensors.torch import load_file

    assert params_from_state_dict(load_file(tiny_file)) == tiny_vae_params()


def test_params_from_state_dict_rejects_non_ae_keys() -> None:
    with pytest.raises(ValueError, match="encoder.conv_in.weight"):
        params_from_state_dict({"img_in.weight": torch.empty(3072, 64, device="meta")})


# --------------------------------------------------------------------------- model


def test_every_weight_is_created_through_the_operations_namespace() -> None:
    class Conv2d(nn.Conv2d):
        pass

    class GroupNorm(nn.GroupNorm):
        pass

    operations = SimpleNamespace(Conv2d=Conv2d, GroupNorm=GroupNorm)
    model = AutoEncoder(tiny_vae_params(), device="meta", operations=operations)
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    assert owners and all(isinstance(m, (Conv2d, GroupNorm)) for m in owners)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_encode_decode_shapes_and_dtype(tiny_file: Path, dtype: torch.dtype) -> None:
    model = load_vae(tiny_file, dtype=dtype)
    image = random_image(24, 40).to(dtype)
    with torch.no_grad():
        latent = model.encode(image)
        decoded = model.decode(latent)
    assert latent.shape == (2, 16, 12, 20)  # two levels: one downsample, H/2
    assert decoded.shape == image.shape
    assert latent.dtype == decoded.dtype == dtype
    assert torch.isfinite(decoded.float()).all()


def test_four_level_model_downscales_by_8() -> None:
    params = AutoEncoderParams(**{**tiny_vae_params().__dict__, "ch_mult": (1, 1, 2, 2)})
    model = AutoEncoder(params).eval()
    with torch.no_grad():
        latent = model.encode(random_image(32, 16, batch=1))
        decoded = model.decode(latent)
    assert latent.shape == (1, 16, 4, 2)
    assert decoded.shape == (1, 3, 32, 16)


def test_encode_is_deterministic_normalised_posterior_mean(tiny_model: AutoEncoder) -> None:
    image = random_image(16, 16)
    with torch.no_grad():
        first, second = tiny_model.encode(image), tiny_model.encode(image)
        mean = tiny_model.encoder(image)[:, :16]
        decoded = tiny_model.decode(first)
        expected_decoded = tiny_model.decoder(mean)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, SCALE_FACTOR * (mean - SHIFT_FACTOR))
    # decode undoes the normalisation before the decoder runs.
    torch.testing.assert_close(decoded, expected_decoded, rtol=1e-4, atol=1e-5)


def test_wrong_channel_count_is_rejected(tiny_model: AutoEncoder) -> None:
    with pytest.raises(ValueError, match=r"\[B, 16, H, W\].*\(1, 4, 8, 8\)"):
        tiny_model.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_model.encode(torch.zeros(3, 16, 16))


# --------------------------------------------------------------------------- faithfulness


def comfyui_checkout() -> Path | None:
    root = Path(os.path.expanduser(os.environ.get("COMFYUI_PATH", "~/comfy/ComfyUI")))
    return root if (root / "comfy" / "ldm" / "modules" / "diffusionmodules" / "model.py").is_file() else None


@pytest.fixture(scope="module")
def comfy_vae_model():
    """ComfyUI's own Encoder/Decoder module (``comfy.ldm.modules.diffusionmodules.model``)."""
    root = comfyui_checkout()
    if root is None:
        skip_or_fail("no ComfyUI checkout at $COMFYUI_PATH or ~/comfy/ComfyUI; faithfulness test skipped")
    if str(root) not in sys.path:
        # Appended, not prepended: ComfyUI's top-level names (nodes, utils) must not shadow ours.
        sys.path.append(str(root))
    if "comfy.model_management" not in sys.modules:
        # model_management picks a device at import time; force CPU before it loads.
        from comfy.cli_args import args

        args.cpu = True
    import comfy.ldm.modules.diffusionmodules.model as comfy_model

    return comfy_model


def test_matches_comfyui_flux_vae(comfy_vae_model, tiny_file: Path) -> None:
    from safetensors.torch import load_file

    params = tiny_vae_params()
    config = dict(
        ch=params.ch,
        out_ch=params.out_ch,
        ch_mult=list(params.ch_mult),
        num_res_blocks=params.num_res_blocks,
        attn_resolutions=[],
        in_channels=params.in_channels,
        resolution=params.resolution,
        z_channels=params.z_channels,
        double_z=True,
    )
    weights = {key: value.float() for key, value in load_file(tiny_file).items()}
    encoder = comfy_vae_model.Encoder(**config).eval()
    decoder = comfy_vae_model.Decoder(**config).eval()
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")})
    decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in weights.items() if k.startswith("decoder.")})
    ours = load_vae(tiny_file, dtype=torch.float32)

    image = random_image(24, 40)
    with torch.no_grad():
        # ComfyUI: posterior mode, then latent_formats.Flux.process_in / process_out.
        expected_latent = (encoder(image)[:, : params.z_channels] - SHIFT_FACTOR) * SCALE_FACTOR
        expected_image = decoder(expected_latent / SCALE_FACTOR + SHIFT_FACTOR)
        latent = ours.encode(image)
        decoded = ours.decode(expected_latent)
    assert max_relative(latent, expected_latent) < 1e-5, "encode differs from ComfyUI"
    assert max_relative(decoded, expected_image) < 1e-5, "decode differs from ComfyUI"


def test_building_blocks_match_their_definitions() -> None:
    """Runs without ComfyUI: each layer against the formula from the FLUX source, written out."""
    import torch.nn.functional as F

    from step1x_core.vae.layers import AttnBlock, Downsample, ResnetBlock, Upsample

    torch.manual_seed(0)
    x = torch.randn(2, 32, 5, 6)

    def norm(layer: nn.GroupNorm, h: torch.Tensor) -> torch.Tensor:
        return F.group_norm(h, 32, layer.weight, layer.bias, eps=1e-6)

    def conv(layer: nn.Conv2d, h: torch.Tensor, padding: int = 0, stride: int = 1) -> torch.Tensor:
        return F.conv2d(h, layer.weight, layer.bias, stride=stride, padding=padding)

    def swish(h: torch.Tensor) -> torch.Tensor:
        return h * torch.sigmoid(h)

    with torch.no_grad():
        block = ResnetBlock(32, 64)
        for p in block.parameters():  # GroupNorm starts at identity; perturb it so eps/affine matter
            p.add_(0.1 * torch.randn_like(p))
        h = conv(block.conv1, swish(norm(block.norm1, x)), padding=1)
        h = conv(block.conv2, swish(norm(block.norm2, h)), padding=1)
        torch.testing.assert_close(block(x), conv(block.nin_shortcut, x) + h)

        attn = AttnBlock(32)
        normed = norm(attn.norm, x)
        q, k, v = (conv(proj, normed).flatten(2) for proj in (attn.q, attn.k, attn.v))  # [B, C, HW]
        weights = torch.softmax(q.transpose(1, 2) @ k / 32**0.5, dim=-1)  # [B, HW(query), HW(key)]
        attended = (v @ weights.transpose(1, 2)).reshape(x.shape)
        torch.testing.assert_close(attn(x), x + conv(attn.proj_out, attended))

        down = Downsample(32)
        padded = torch.zeros(2, 32, 6, 7)
        padded[:, :, :5, :6] = x  # one zero row at the bottom, one zero column on the right
        torch.testing.assert_close(down(x), conv(down.conv, padded, stride=2))

        up = Upsample(32)
        repeated = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        torch.testing.assert_close(up(x), conv(up.conv, repeated, padding=1))


# --------------------------------------------------------------------------- loading


class RecordInitOps(TorchDispatchMode):
    """Records random-init aten ops and the devices they ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.init_devices: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.uniform_, torch.ops.aten.normal_, torch.ops.aten.bernoulli_):
            self.init_devices.append(str(args[0].device))
        return func(*args, **(kwargs or {}))


def mapped_files_containing(pointer: int) -> list[str]:
    with open("/proc/self/maps") as maps:
        rows = [line.split() for line in maps]
    return [
        row[-1]
        for row in rows
        if len(row) >= 6 and int(row[0].split("-")[0], 16) <= pointer < int(row[0].split("-")[1], 16)
    ]


def test_load_vae_builds_on_meta_and_assigns_memory_mapped_weights(tiny_file: Path) -> None:
    with RecordInitOps() as recorder:
        model = load_vae(tiny_file, dtype=torch.float16)  # the file's own dtype: no conversion copy
    assert all(device == "meta" for device in recorder.init_devices), recorder.init_devices
    parameters = list(model.parameters())
    assert parameters and not any(p.is_meta for p in parameters)
    assert all(p.dtype == torch.float16 and not p.requires_grad for p in parameters)
    assert not model.training
    expected = tiny_vae_state_dict()["decoder.conv_out.weight"].half()
    torch.testing.assert_close(model.decoder.conv_out.weight, expected, rtol=0, atol=0)
    if Path("/proc/self/maps").is_file():
        assert tiny_file.name in " ".join(mapped_files_containing(model.decoder.conv_out.weight.data_ptr()))


def test_load_vae_logs_one_summary_line(tiny_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="step1x_core.vae.loader"):
        load_vae(tiny_file)
    messages = [r.getMessage() for r in caplog.records if r.name == "step1x_core.vae.loader"]
    assert len(messages) == 1
    assert VAE in messages[0] and "ch=32" in messages[0] and "float32" in messages[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VAEFileError, match="not found.*absent.safetensors"):
        load_vae(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_suffix_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ae{suffix}"
    path.write_bytes(b"\x80\x02}q\x00.")  # a pickle: must never be unpickled
    with pytest.raises(VAEFileError, match=rf"ae\{suffix}: only \.safetensors"):
        load_vae(path)


@pytest.mark.parametrize("keep", [0.5, 0.001], ids=["data-truncated", "header-truncated"])
def test_truncated_file(tiny_file: Path, tmp_path: Path, keep: float) -> None:
    data = tiny_file.read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(VAEFileError, match="broken.safetensors cannot be read as safetensors"):
        load_vae(broken)


def test_dit_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "step1x-edit.safetensors"
    save_file(
        {
            "img_in.weight": torch.zeros(8, 4),
            "double_blocks.0.img_attn.qkv.weight": torch.zeros(12, 4),
            "single_blocks.0.linear1.weight": torch.zeros(12, 4),
        },
        str(path),
    )
    with pytest.raises(VAEFileError, match=r"no 'encoder.conv_in.weight'.*DiT.*ae.safetensors.*16 latent"):
        load_vae(path)


def test_sd_vae_is_named(tmp_path: Path) -> None:
    path = tmp_path / "sdxl_vae.safetensors"
    save_file(
        {
            "encoder.conv_in.weight": torch.zeros(32, 3, 3, 3),
            "encoder.conv_out.weight": torch.zeros(8, 32, 3, 3),
            "quant_conv.weight": torch.zeros(8, 8, 1, 1),
            "post_quant_conv.weight": torch.zeros(4, 4, 1, 1),
            "decoder.conv_in.weight": torch.zeros(32, 4, 3, 3),
            "decoder.conv_out.weight": torch.zeros(3, 32, 3, 3),
        },
        str(path),
    )
    with pytest.raises(VAEFileError, match=r"SD1.x/SDXL.*4 latent channels.*ae.safetensors.*16 latent"):
        load_vae(path)


def test_four_channel_vae_without_quant_conv_is_named(tmp_path: Path) -> None:
    params = AutoEncoderParams(**{**tiny_vae_params().__dict__, "z_channels": 4})
    path = tmp_path / "small_z.safetensors"
    save_file(tiny_vae_state_dict(params=params), str(path))
    with pytest.raises(VAEFileError, match="4 latent channels.*16 latent channels"):
        load_vae(path)


def test_diffusers_layout_loads_as_the_same_model() -> None:
    """The v1.2 release's vae/ folder (diffusers AutoencoderKL) and BFL's layout of the same weights."""
    from tests.golden_v12 import golden_v12_dir

    folder = golden_v12_dir() / "tiny_vae"
    if not folder.is_dir():
        pytest.skip(f"no {folder}")
    from_folder = load_vae(folder)  # config.json: 2 GroupNorm groups
    from_file = load_vae(folder.with_name("tiny_vae_bfl.safetensors"), norm_groups=2)
    assert from_folder.params == from_file.params and from_folder.params.norm_groups == 2
    file_weights = from_file.state_dict()
    assert all(torch.equal(t, file_weights[k]) for k, t in from_folder.state_dict().items())
    single = load_vae(folder / "diffusion_pytorch_model.safetensors", norm_groups=2)  # one file, same layout
    assert all(torch.equal(t, file_weights[k]) for k, t in single.state_dict().items())


def test_incomplete_diffusers_layout_is_named(tmp_path: Path) -> None:
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(
        {
            "encoder.conv_in.weight": torch.zeros(32, 3, 3, 3),
            "encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(32, 32, 3, 3),
            "decoder.conv_in.weight": torch.zeros(32, 16, 3, 3),
        },
        str(path),
    )
    with pytest.raises(VAEFileError, match="does not have the FLUX AE layout.*missing"):
        load_vae(path)


def test_incomplete_flux_layout_lists_missing_keys(tiny_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(tiny_file)
    del weights["encoder.mid.attn_1.q.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(weights, str(path))
    with pytest.raises(VAEFileError,
                       match=r"partial.safetensors: lacks 1 tensor\(s\), e.g. encoder.mid.attn_1.q.weight"):
        load_vae(path)
