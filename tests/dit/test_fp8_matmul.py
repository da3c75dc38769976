"""The optional fp8 matmul (torch._scaled_mm) for the DiT's Linear layers: correct, bounded error, opt-in.

PyTorch's CPU build has an fp8 _scaled_mm kernel, so the arithmetic is checked here; the speed only
exists on GPUs with fp8 tensor cores (measured with `python -m step1x_core.commands.bench --variants fp8`).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from step1x_core.commands import bench
from step1x_core.dit.loading import build_dit, load_dit, read_dit_checkpoint
from step1x_core.ops import CastLinear, Fp8MatmulLinear, fp8_matmul_available
from step1x_core.testing.tiny_dit import tiny_dit_params, tiny_dit_state_dict
from step1x_core.commands.bench_measure import relative_error

pytestmark = pytest.mark.skipif(not fp8_matmul_available("cpu"),
                                reason=f"torch {torch.__version__} has no CPU fp8 _scaled_mm kernel")


def _pair(in_features: int, out_features: int, seed: int = 0) -> tuple[CastLinear, Fp8MatmulLinear]:
    torch.manual_seed(seed)
    cast = CastLinear(in_features, out_features)
    cast.weight.data = cast.weight.data.to(torch.float8_e4m3fn)
    fast = Fp8MatmulLinear(in_features, out_features)
    fast.load_state_dict(cast.state_dict(), assign=True)  # keeps the fp8 dtype
    return cast, fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e4])
def test_fp8_matmul_tracks_the_cast_path_at_any_activation_scale(dtype, magnitude) -> None:
    """Activations are scaled into e4m3's range, never clipped: 1e4-sized inputs (FLUX-like outliers) keep
    the same small relative error as unit ones."""
    cast, fast = _pair(64, 48)
    x = (torch.randn(2, 10, 64) * magnitude).to(dtype)
    with torch.no_grad():
        expected, ours = cast(x), fast(x)
    assert ours.dtype == dtype and ours.shape == expected.shape
    error = relative_error(ours.float(), expected.float())
    assert 0 < error < 4e-2, error  # e4m3 keeps 3 mantissa bits of the activations


def test_shapes_scaled_mm_cannot_take_use_the_cast_path_exactly() -> None:
    cast, fast = _pair(40, 48)  # 40 is not a multiple of 16
    x = torch.randn(3, 40)
    with torch.no_grad():
        assert torch.equal(fast(x), cast(x))


def test_non_fp8_weights_use_the_cast_path_exactly() -> None:
    layer = Fp8MatmulLinear(64, 32)
    reference = CastLinear(64, 32)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), reference(x))


@pytest.fixture(scope="module")
def tiny_fp8_file(tmp_path_factory):
    params = tiny_dit_params("v1.1")
    path = tmp_path_factory.mktemp("fp8mm") / "tiny_fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim >= 2 else v for k, v in tiny_dit_state_dict(params).items()},
              str(path))
    return path


def test_dit_with_fp8_matmul_stays_close_to_per_layer_casting(tiny_fp8_file) -> None:
    cast_model = load_dit(tiny_fp8_file)
    fast_model = load_dit(tiny_fp8_file, fp8_matmul=True)
    assert any(isinstance(m, Fp8MatmulLinear) for m in fast_model.modules())
    assert not any(isinstance(m, Fp8MatmulLinear) for m in cast_model.modules())  # opt-in
    ckpt = read_dit_checkpoint(tiny_fp8_file)
    p = ckpt.params
    torch.manual_seed(1)
    img = torch.randn(2, 16, p.in_channels)
    img_ids = torch.zeros(2, 16, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(16).div(4, rounding_mode="floor"), torch.arange(16) % 4
    llm = torch.randn(2, 12, p.connector.in_channels)
    mask = torch.ones(2, 12, dtype=torch.long)
    t = torch.full((2,), 0.7)
    with torch.no_grad():
        args = (img, img_ids, torch.zeros(2, 12, 3), t, llm, t, mask)
        exact, fast = cast_model(*args), fast_model(*args)
    error = relative_error(fast, exact)
    assert 0 < error < 5e-2, error


def test_fp8_matmul_needs_fp8_weights(tiny_fp8_file) -> None:
    with pytest.raises(ValueError, match="fp8 matmul needs float8_e4m3fn weights.*--weight-dtype float8_e4m3fn"):
        build_dit(read_dit_checkpoint(tiny_fp8_file), dtype=torch.bfloat16, fp8_matmul=True)


@pytest.mark.slow
def test_benchmark_measures_both_fp8_paths(tmp_path) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(["--config", "tiny", "--steps", "2", "--size", "128", "--variants", "fp8", "--no-load",
                       "--json", str(out)]) == 0
    import json

    results = json.loads(out.read_text())["results"]
    cast = results["fp8 weights (cast per layer)"]["error_vs_exact"]
    matmul = results["fp8 matmul (torch._scaled_mm)"]["error_vs_exact"]
    assert 0 < cast < 5e-2 and 0 < matmul < 1e-1  # lossy, and measured against the exact path
