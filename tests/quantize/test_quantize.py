"""step1x-edit-quantize: ComfyUI's mixed fp8 and GGUF files from every kind of Step1X-Edit DiT, streamed, and
loaded back by the engine within the measured error of the bf16 model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from step1x_core.dit.checkpoint import CheckpointError
from step1x_core.dit.loading import load_dit, read_dit_checkpoint
from step1x_core.quantize import FORMATS, quantize_dit
from step1x_core.quantize.core import KEPT_PREFIXES, QuantizeError
from step1x_core.dit.quantized import QuantizedLinear
from step1x_core.formats.ggml import dequantize
from step1x_core.commands.bench_measure import relative_error
from step1x_core.commands.bench_quantize import dit_inputs, velocity
from step1x_core.testing.factory import TEXT_GAIN
from step1x_core.testing.tiny_dit import write_tiny_dit
from step1x_core.testing.tiny_v12 import write_tiny_v12_transformer
from tests.golden import REPO_ROOT
from tests.quantize.measured import CALL_ERROR, EDIT_ERROR

gguf = pytest.importorskip("gguf")

CAT = REPO_ROOT / "tests" / "data" / "cat.png"


def _suffix(fmt: str) -> str:
    return ".safetensors" if fmt == "fp8" else ".gguf"


@pytest.fixture(scope="module")
def v11(tmp_path_factory):
    return write_tiny_dit(tmp_path_factory.mktemp("v11") / "step1x-edit-v1p1-official.safetensors", "v1.1",
                          text_gain=TEXT_GAIN)


@pytest.mark.parametrize("name", ["Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "BF16"])
def test_engine_dequantisation_is_the_gguf_reference(name):
    values = np.random.default_rng(0).standard_normal((8, 96)).astype(np.float32) * 3
    kind = gguf.GGMLQuantizationType[name]
    data = gguf.quants.quantize(values, kind)
    expected = gguf.quants.dequantize(data, kind)
    assert np.array_equal(dequantize(torch.from_numpy(data), name, (8, 96)).numpy(), expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_in_the_engine_within_the_measured_error(v11, tmp_path, fmt):
    out = tmp_path / f"dit-{fmt}{_suffix(fmt)}"
    report = quantize_dit(v11, fmt, out, progress=False)
    assert report.version == "v1.1" and report.source_layout == "original"
    reference = load_dit(v11, dtype=torch.float32)
    inputs = dit_inputs(reference.params)
    model = load_dit(out, dtype=torch.float32)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert quantized and all(m.kind == ("F8_E4M3" if fmt == "fp8" else fmt.upper()) for m in quantized)
    assert model.double_blocks[0].img_attn.qkv in quantized and model.img_in not in quantized  # kept in bf16
    error = relative_error(velocity(model, inputs), velocity(reference, inputs))
    assert 0 < error < CALL_ERROR[fmt], (fmt, error)
    assert out.stat().st_size < v11.stat().st_size


def test_mixed_fp8_beats_the_plain_fp8_cast(v11, tmp_path):
    out = quantize_dit(v11, "fp8", tmp_path / "dit-fp8.safetensors", progress=False).output
    reference = load_dit(v11, dtype=torch.float32)
    inputs = dit_inputs(reference.params)
    cast = load_dit(v11, dtype=torch.float8_e4m3fn)
    cast_error = relative_error(velocity(cast, dit_inputs(cast.params)), velocity(reference, inputs))
    mixed_error = relative_error(velocity(load_dit(out, dtype=torch.float32), inputs), velocity(reference, inputs))
    assert mixed_error < 0.75 * cast_error, (mixed_error, cast_error)


def test_mixed_fp8_file_is_comfyuis_format(v11, tmp_path):
    out = quantize_dit(v11, "fp8", tmp_path / "dit-fp8.safetensors", progress=False).output
    with safe_open(str(out), "pt") as f:
        metadata, names = f.metadata(), set(f.keys())
        layers = json.loads(metadata["_quantization_metadata"])["layers"]
        assert layers and all(spec == {"format": "float8_e4m3fn"} for spec in layers.values())
        for layer in layers:
            assert f.get_tensor(f"{layer}.weight").dtype == torch.float8_e4m3fn
            scale = f.get_tensor(f"{layer}.weight_scale")
            assert scale.dtype == torch.float32 and scale.shape == () and scale > 0
        kept = json.loads(metadata["step1x.kept_bf16"])
        assert set(kept) >= {"img_in", "txt_in", "final_layer.linear"} and not set(kept) & set(layers)
        assert all(f.get_tensor(f"{layer}.weight").dtype == torch.bfloat16 for layer in kept)
    assert metadata["step1x.version"] == "v1.1" and metadata["step1x.source_layout"] == "original"
    assert {f"{layer}.weight_scale" for layer in layers} <= names


def test_v12_folder_as_gguf_loads_as_v12_with_its_text_token_mapping(tmp_path):
    folder = write_tiny_v12_transformer(tmp_path / "Step1X-Edit-v1p2" / "transformer", seed=2, text_gain=TEXT_GAIN)
    out = quantize_dit(folder, "q8_0", tmp_path / "v12.gguf", progress=False).output
    reader = gguf.GGUFReader(out)
    field = lambda key: str(bytes(reader.get_field(key).parts[reader.get_field(key).data[-1]]), "utf-8")  # noqa: E731
    assert field("general.architecture") == "flux"
    assert field("step1x.version") == "v1.2" and field("step1x.source_layout") == "diffusers"
    names = {t.name for t in reader.tensors}
    assert "text_token_mapping.weight" in names and "double_blocks.0.img_attn.qkv.weight" in names
    ckpt = read_dit_checkpoint(out)
    assert ckpt.params.version == "v1.2" and ckpt.params == read_dit_checkpoint(folder).params
    reference = load_dit(folder, dtype=torch.float32)
    model = load_dit(out, dtype=torch.float32)
    inputs = dit_inputs(reference.params)
    assert relative_error(velocity(model, inputs), velocity(reference, inputs)) < 0.05


def test_v10_keeps_its_scale_factor_and_fp8_sources_are_read(tmp_path):
    source = write_tiny_dit(tmp_path / "v10-fp8.safetensors", "v1.0", dtype=torch.float8_e4m3fn)
    for fmt in ("fp8", "q4_1"):
        out = quantize_dit(source, fmt, tmp_path / f"v10{_suffix(fmt)}", progress=False).output
        ckpt = read_dit_checkpoint(out)
        assert ckpt.params.version == "v1.0" and "connector.scale_factor" in ckpt.state_dict


def test_a_file_that_is_not_a_step1x_dit_gets_the_loaders_message_and_nothing_is_written(tmp_path):
    from safetensors.torch import save_file

    vae = tmp_path / "ae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(512, 16, 3, 3),
               "encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}, str(vae))
    with pytest.raises(CheckpointError, match="is not a Step1X-Edit DiT"):
        quantize_dit(vae, "q8_0", tmp_path / "out.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae.safetensors"]


def test_output_names_are_checked(v11, tmp_path):
    with pytest.raises(QuantizeError, match=r"written as \.gguf"):
        quantize_dit(v11, "q4_0", tmp_path / "x.safetensors", progress=False)
    with pytest.raises(QuantizeError, match=r"written as \.safetensors"):
        quantize_dit(v11, "fp8", tmp_path / "x.gguf", progress=False)
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    with pytest.raises(QuantizeError, match="--overwrite"):
        quantize_dit(v11, "q4_0", tmp_path / "taken.gguf", progress=False)
    assert (tmp_path / "taken.gguf").read_bytes() == b"mine"


def test_unblockable_rows_stay_wide(tmp_path):
    """GGML blocks are 32 values of a row; a matrix whose rows are not whole blocks is kept (BF16), as
    ComfyUI-GGUF reads it."""
    from step1x_core.quantize.core import ggml_type

    assert ggml_type("double_blocks.0.img_mlp.0.weight", (64, 48), "q4_0") == "BF16"
    assert ggml_type("double_blocks.0.img_mlp.0.weight", (64, 64), "q4_0") == "Q4_0"
    assert ggml_type("double_blocks.0.img_attn.qkv.bias", (192,), "q4_0") == "F32"
    assert all(ggml_type(f"{p}weight", (256, 256), "q8_0") == "BF16" for p in KEPT_PREFIXES)


@pytest.mark.slow
def test_command_line(v11, tmp_path):
    out = tmp_path / "dit.gguf"
    done = subprocess.run([sys.executable, "-m", "step1x_core.commands.quantize", str(v11), "--format", "q5_1",
                           "--output", str(out)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "v1.1" in done.stdout and "%" in done.stderr  # the progress bar
    again = subprocess.run([sys.executable, "-m", "step1x_core.commands.quantize", str(v11), "--format", "q5_1",
                            "--output", str(out)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert again.returncode == 2 and again.stderr.startswith("step1x-edit-quantize: error:")
    assert "--overwrite" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp8", "q4_1"])
def test_quantizing_a_2_gb_file_holds_less_than_1_gb(tmp_path, fmt):
    """A random DiT with the released widths (one block of each kind, the full connector): 2.1 GB in bf16."""
    from step1x_core.commands.bench_quantize import quantize_peak_memory, wide_dit_params, write_random_dit

    source = write_random_dit(tmp_path / "wide.safetensors", wide_dit_params(1, 1))
    assert source.stat().st_size > 2_000_000_000
    measured = quantize_peak_memory(source, fmt, tmp_path / f"wide-{fmt}{_suffix(fmt)}")
    assert measured["held_bytes"] < 1_000_000_000, measured
    assert read_dit_checkpoint(tmp_path / f"wide-{fmt}{_suffix(fmt)}").params.hidden_size == 3072


@pytest.mark.slow
def test_each_format_edits_through_the_command_line_within_the_measured_error(tiny_models, tmp_path):
    from step1x_core.commands.bench_quantize import edit_image

    source = tiny_models / "diffusion_models" / "step1x-edit-v1p1-official.safetensors"
    reference = edit_image(tiny_models, source, CAT, tmp_path / "bf16.png")
    for fmt in FORMATS:
        out = quantize_dit(source, fmt, tmp_path / f"dit-{fmt}{_suffix(fmt)}", progress=False).output
        error = relative_error(edit_image(tiny_models, out, CAT, tmp_path / f"{fmt}.png"), reference)
        assert 0 < error < EDIT_ERROR[fmt], (fmt, error)


@pytest.mark.slow
def test_the_python_api_loads_both_formats(tiny_models, tmp_path):
    """Step1XEditPipeline.from_files (what the batch runner builds its pipelines with) takes either file."""
    from PIL import Image

    from step1x_core.pipeline import EditSettings, Step1XEditPipeline

    source = tiny_models / "diffusion_models" / "step1x-edit-v1p1-official.safetensors"
    for fmt in ("fp8", "q4_1"):
        out = quantize_dit(source, fmt, tmp_path / f"dit-{fmt}{_suffix(fmt)}", progress=False).output
        pipe = Step1XEditPipeline.from_files(out, tiny_models / "vae" / "ae.safetensors",
                                             tiny_models / "text_encoders" / "Qwen2.5-VL-7B-Instruct", device="cpu")
        assert pipe.version == "v1.1" and any(isinstance(m, QuantizedLinear) for m in pipe.dit.modules())
        image = pipe(Image.open(CAT), "add a red hat", EditSettings(steps=1, size_level=64))
        assert image.size == Image.open(CAT).size
