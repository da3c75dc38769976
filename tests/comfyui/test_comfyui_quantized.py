"""Files made by step1x-edit-quantize in ComfyUI, in process: the mixed fp8 file through Load Step1X-Edit DiT and
native Load Diffusion Model (ComfyUI 0.3.75+; on older ComfyUI both say which version it needs), and a GGUF file
given to Load Step1X-Edit DiT pointed to ComfyUI-GGUF. ComfyUI-GGUF itself: tests/test_comfyui_gguf.py."""

from __future__ import annotations

import pytest

from step1x_core.quantize import quantize_dit
from step1x_core.commands.bench_measure import relative_error
from tests.comfyui.graphs import model_velocity, pack_module
from tests.release_names import V11_DIT

pytestmark = pytest.mark.comfyui
# One model call against the bf16 file's: the engine's measured fp8 error on the tiny v1.1 DiT (0.059,
# tests/test_quantize.py) with room for ComfyUI's own fp8 layers and these inputs.
FP8_CALL_ERROR = 0.1


@pytest.fixture(scope="module")
def fp8_file(comfyui):
    name = "step1x-edit-v1p1-fp8mixed.safetensors"
    folder = comfyui.models / "diffusion_models"
    quantize_dit(folder / V11_DIT, "fp8", folder / name, progress=False, overwrite=True)
    comfyui.invalidate_file_lists()
    return name


def _mixed_precision(comfyui) -> bool:
    import comfy.ops

    return hasattr(comfy.ops, "mixed_precision_ops")


def test_mixed_fp8_file_loads_through_both_loaders_or_names_the_comfyui_it_needs(comfyui, fp8_file):
    loader, native = comfyui.node_class("Step1XEditDiTLoader"), comfyui.node_class("UNETLoader")()
    if not _mixed_precision(comfyui):  # 0.3.64 would read the fp8 weights without their scales
        with pytest.raises(ValueError, match=r"ComfyUI 0\.3\.75 or newer"):
            loader.execute(fp8_file, "default", "auto")
        with pytest.raises(ValueError, match=r"ComfyUI 0\.3\.75 or newer"):
            native.load_unet(fp8_file, "default")
        return
    reference = model_velocity(loader.execute(V11_DIT, "default", "auto").result[0])
    ours = loader.execute(fp8_file, "default", "auto").result[0]
    theirs = native.load_unet(fp8_file, "default")[0]
    for patcher in (ours, theirs):
        qkv = patcher.model.diffusion_model.double_blocks[0].img_attn.qkv
        assert type(qkv).__module__ == "comfy.ops" and "MixedPrecision" in type(qkv).__qualname__, type(qkv)
        assert type(qkv.weight).__name__ == "QuantizedTensor"
        img_in = patcher.model.diffusion_model.img_in  # kept in bf16 by the quantizer
        assert type(img_in.weight).__name__ != "QuantizedTensor"
    velocity = model_velocity(ours)
    assert relative_error(velocity, model_velocity(theirs)) <= 1e-6
    assert 0 < relative_error(velocity, reference) < FP8_CALL_ERROR


def test_a_gguf_file_given_to_load_step1x_edit_dit_points_to_comfyui_gguf(comfyui, tmp_path):
    folder = comfyui.models / "diffusion_models"
    out = quantize_dit(folder / V11_DIT, "q8_0", tmp_path / "dit-Q8_0.gguf", progress=False).output
    with pytest.raises(ValueError, match=r"Unet Loader \(GGUF\)"):
        pack_module("dit_loading").load_dit(out)
