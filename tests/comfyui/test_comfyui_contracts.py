"""Every place the pack touches ComfyUI, called the way the newest ComfyUI calls it (0.38-era files of
Comfy-Org/ComfyUI, each test's docstring names the file and commit the call is copied from), and FLUX's
block protocol as of 0.3.75 on the Step1X-Edit DiT. Runs on every ComfyUI tree the tests have.

Dynamic VRAM itself (comfy-aimdo, NVIDIA only) cannot run here; its one demand on a model, Linear layers
created without weights until the state dict loads (`comfy/ops.py` 0271a46, `disable_weight_init.Linear`), is
simulated by ``LazyLinearOps``.
"""

from __future__ import annotations

import inspect
import shutil

import pytest
import torch

from step1x_core.formats.identify import STEP1X_DIT, identify
from step1x_core.testing.tiny_dit import tiny_dit_params, tiny_dit_state_dict
from step1x_core.commands.bench_measure import relative_error
from tests.comfyui.graphs import QWEN_FOLDER, SIZE, V11_DIT, edit_graph, run_ok, saved_latent
from tests.release_names import V10_DIT, VAE
from tests.comfyui.graphs import model_velocity, pack_module

pytestmark = pytest.mark.comfyui
BIT_EXACT = 1e-6


def _step1x_state_dict(version="v1.1") -> dict[str, torch.Tensor]:
    return tiny_dit_state_dict(tiny_dit_params(version), seed=0)


def _meta_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Zero tensors of a model's shapes that take no memory (detection and loading read shapes and copy)."""
    return {key: torch.zeros((), dtype=torch.float16).expand(value.shape) for key, value in
            module.state_dict().items()}


def _flux_state_dict() -> dict[str, torch.Tensor]:
    """A FLUX.1-dev-shaped DiT (one block of each kind), as ComfyUI's own Flux class names its weights."""
    import dataclasses

    import comfy.ldm.flux.model
    import comfy.ops

    wanted = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                  mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
                  patch_size=2, qkv_bias=True, guidance_embed=True)
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    with torch.device("meta"):
        flux = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init,
                                         **{k: v for k, v in wanted.items() if k in fields})
    return _meta_state_dict(flux)


SD15_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 use_temporal_attention=False, use_temporal_resblock=False)


def _sd15_state_dict() -> dict[str, torch.Tensor]:
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops

    with torch.device("meta"):
        unet = openaimodel.UNetModel(**SD15_UNET, operations=comfy.ops.disable_weight_init)
    return _meta_state_dict(unet)


@pytest.fixture
def detection_as_in_0_38(comfyui, monkeypatch):
    """ComfyUI 0.38's detection loop, `comfy/model_detection.py` at 0b61ce5:

        for model_config in comfy.supported_models.models:
            if model_config.matches(unet_config, state_dict, unet_key_prefix=unet_key_prefix):

    ComfyUI's own configs take ``unet_key_prefix`` there; on older trees their ``matches`` is given it here."""
    import comfy.model_detection
    import comfy.supported_models
    import comfy.supported_models_base

    base_matches = comfy.supported_models_base.BASE.matches.__func__
    if "unet_key_prefix" not in inspect.signature(base_matches).parameters:
        monkeypatch.setattr(comfy.supported_models_base.BASE, "matches", classmethod(
            lambda cls, unet_config, state_dict=None, unet_key_prefix="": base_matches(cls, unet_config, state_dict)))
    calls = []

    def model_config_from_unet_config(unet_config, state_dict=None, unet_key_prefix=""):
        for model_config in comfy.supported_models.models:
            if model_config.matches(unet_config, state_dict, unet_key_prefix=unet_key_prefix):
                calls.append(model_config)
                return model_config(unet_config)
        return None

    monkeypatch.setattr(comfy.model_detection, "model_config_from_unet_config", model_config_from_unet_config)
    return calls


# ---- detection ----------------------------------------------------------------------------------------------
def test_step1x_config_is_first_and_matches_takes_the_0_38_arguments(comfyui):
    """`comfy/model_detection.py` 0b61ce5 calls ``matches(unet_config, state_dict, unet_key_prefix=...)`` on
    every config for every file a user loads; the pack's config is first in the list."""
    import comfy.supported_models

    config = comfy.supported_models.models[0]
    assert config.__name__ == "Step1XEditConfig"
    flux_config = {"image_model": "flux"}
    step1x = _step1x_state_dict()
    assert config.matches(flux_config, step1x, unet_key_prefix="")
    prefixed = {f"model.diffusion_model.{k}": v for k, v in step1x.items()}
    assert config.matches(flux_config, prefixed, unet_key_prefix="model.diffusion_model.")
    assert config.matches(flux_config, step1x, unet_key_prefix="", metadata={"a later": "argument"})
    assert not config.matches(flux_config, _flux_state_dict(), unet_key_prefix="")
    assert not config.matches({"image_model": "sd3"}, step1x, unet_key_prefix="")


def test_flux_and_sd_still_load_through_native_loaders_with_0_38_detection(detection_as_in_0_38):
    """With the pack installed and detection called as in 0.38, a FLUX checkpoint (prefixed, `comfy/sd.py`
    033046c `load_state_dict_guess_config`) and diffusion model, and an SD1.5 UNet, load as themselves."""
    import comfy.model_base
    import comfy.sd
    import comfy.supported_models

    flux = _flux_state_dict()
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(flux), model_options={"dtype": torch.bfloat16})
    assert type(patcher.model) is comfy.model_base.Flux
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in flux.items()}
    model = comfy.sd.load_state_dict_guess_config(checkpoint, output_vae=False, output_clip=False,
                                                  model_options={"dtype": torch.bfloat16})[0]
    assert type(model.model) is comfy.model_base.Flux
    del patcher, model
    sd15 = comfy.sd.load_diffusion_model_state_dict(_sd15_state_dict(), model_options={"dtype": torch.float16})
    assert type(sd15.model.model_config) is comfy.supported_models.SD15
    assert [c.__name__ for c in detection_as_in_0_38] == ["Flux", "Flux", "SD15"]


def test_native_loader_builds_step1x_edit_with_0_38_detection(detection_as_in_0_38, comfyui, tiny_models):
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(tiny_models / "diffusion_models" / V11_DIT))
    patcher = comfy.sd.load_diffusion_model_state_dict(sd)
    assert patcher.model.model_config.unet_config["image_model"] == "step1x_edit"
    assert [c.__name__ for c in detection_as_in_0_38] == ["Step1XEditConfig"]


def test_get_model_takes_the_0_38_arguments(comfyui):
    """`comfy/sd.py` 033046c: ``model_config.get_model(new_sd, "")`` (diffusion models) and
    ``get_model(sd, diffusion_model_prefix, device=inital_load_device)`` (checkpoints); ComfyUI sets the weight
    dtype first (``set_inference_dtype``), and the model keeps it."""
    import comfy.model_detection

    sd = _step1x_state_dict()
    config = comfy.model_detection.model_config_from_unet(sd, "")
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(sd, "")
    assert model.get_dtype() == torch.float32
    prefixed = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    config = comfy.model_detection.model_config_from_unet(prefixed, "model.diffusion_model.")
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model(prefixed, "model.diffusion_model.", device=torch.device("cpu"), later_argument=1)
    assert model.get_dtype() == torch.bfloat16
    model.load_model_weights(prefixed, "model.diffusion_model.")
    assert torch.equal(model.diffusion_model.img_in.weight, sd["img_in.weight"].to(torch.bfloat16))


def test_diffusers_conversion_takes_the_0_38_call(comfyui):
    """`comfy/sd.py` 033046c: ``model_detection.convert_diffusers_mmdit(sd, "")``. Step1X-Edit files keep their
    connector; every other file gets ComfyUI's own conversion."""
    import comfy.model_detection

    from step1x_core.dit.diffusers_keys import original_to_diffusers

    params = tiny_dit_params("v1.1")
    original = tiny_dit_state_dict(params, seed=0)
    diffusers = original_to_diffusers(original, params.hidden_size)
    converted = comfy.model_detection.convert_diffusers_mmdit(diffusers, "")
    assert set(converted) == set(original) and identify(converted) is STEP1X_DIT
    comfys_own = comfy.model_detection.convert_diffusers_mmdit.__wrapped__
    flux = {k: v for k, v in diffusers.items() if not k.startswith("connector.")}  # a FLUX in diffusers names
    # (ComfyUI's conversion may empty the dict it is given)
    assert set(comfy.model_detection.convert_diffusers_mmdit(dict(flux), "")) == set(comfys_own(dict(flux), "")) \
        != set()
    assert comfy.model_detection.convert_diffusers_mmdit({"unrelated.weight": torch.zeros(1)}, "") is None


# ---- loading: one model either way, and under lazy weights ------------------------------------------------
def test_step1x_loader_and_native_loader_give_the_same_model(comfyui, tiny_models):
    """Load Step1X-Edit DiT and native Load Diffusion Model, on each tiny release file and on the diffusers
    layout of one: the same model class and config, and the same output to 1e-6."""
    from step1x_core.testing.factory import TEXT_GAIN
    from step1x_core.testing.tiny_dit import write_tiny_dit

    loader, native = comfyui.node_class("Step1XEditDiTLoader"), comfyui.node_class("UNETLoader")()
    write_tiny_dit(comfyui.models / "diffusion_models" / "same-model-diffusers.safetensors", "v1.1", seed=1,
                   text_hidden=64, text_gain=TEXT_GAIN, layout="diffusers")
    comfyui.invalidate_file_lists()
    for name in (V10_DIT, V11_DIT, "same-model-diffusers.safetensors"):
        ours = loader.execute(name, "default", "auto").result[0]
        theirs = native.load_unet(name, "default")[0]
        assert type(ours.model) is type(theirs.model)
        assert ours.model.diffusion_model.params == theirs.model.diffusion_model.params
        error = relative_error(model_velocity(ours), model_velocity(theirs))
        assert error <= BIT_EXACT, f"{name}: {error:.2e}"


def test_the_model_can_be_loaded_again_as_comfyui_0_38_asks(comfyui):
    """`comfy/model_patcher.py` 08d0e51: ``clone(disable_dynamic=True)`` (hooks under dynamic VRAM) calls
    ``cached_patcher_init[0](*cached_patcher_init[1], disable_dynamic=True)``, and per-GPU copies call it without;
    both give the same model again."""
    patcher = comfyui.node_class("Step1XEditDiTLoader").execute(V10_DIT, "default", "auto").result[0]
    load, arguments = patcher.cached_patcher_init[:2]
    for again in (load(*arguments, disable_dynamic=True), load(*arguments)):
        assert again.model is not patcher.model
        assert relative_error(model_velocity(again), model_velocity(patcher)) <= BIT_EXACT


class LazyLinearOps:
    """Stands in for ComfyUI 0.38's layers under dynamic VRAM (`comfy/ops.py` 0271a46): a Linear holds no
    weight until its state dict loads (``weight is None`` until then). Filled in by ``lazy_ops()``."""


def lazy_ops():
    import comfy.ops

    built = []

    class Ops(comfy.ops.manual_cast):
        class Linear(comfy.ops.manual_cast.Linear):
            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                torch.nn.Module.__init__(self)
                self.in_features, self.out_features = in_features, out_features
                self.weight, self.bias = None, None
                self.lazy_bias = bias
                built.append(self)

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                for name in ("weight", "bias"):
                    value = state_dict.get(prefix + name)
                    if value is not None:
                        setattr(self, name, torch.nn.Parameter(value.clone(), requires_grad=False))
                    elif name == "weight" or self.lazy_bias:
                        missing_keys.append(prefix + name)

    return Ops, built


def test_dit_loads_samples_and_unloads_under_lazy_weights(comfyui, monkeypatch, tmp_path):
    """The DiT built by ComfyUI with Linear layers that have no weights until loading: it loads (no missing
    key), samples through the Step1X-Edit graph with the same result as eager layers, unloads and samples
    again."""
    import comfy.model_management
    import comfy.ops

    lazy, built = lazy_ops()
    name = "lazy-weights.safetensors"
    shutil.copy(comfyui.models / "diffusion_models" / V11_DIT, comfyui.models / "diffusion_models" / name)
    plain = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=5, dit=V11_DIT, prefix="lazy_plain")))
    real_pick = comfy.ops.pick_operations
    monkeypatch.setattr(comfy.ops, "pick_operations", lambda *a, **k: lazy)
    try:
        latent = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=5, dit=name, prefix="lazy")))
    finally:
        monkeypatch.setattr(comfy.ops, "pick_operations", real_pick)
    assert built and all(layer.weight is not None for layer in built)
    assert relative_error(latent, plain) <= BIT_EXACT
    comfy.model_management.unload_all_models()
    again = saved_latent(comfyui, run_ok(comfyui, edit_graph(seed=5, dit=name, prefix="lazy_again")))
    assert relative_error(again, plain) <= BIT_EXACT


# ---- fp8 matmul on ComfyUI's cast protocol ----------------------------------------------------------------
def test_fp8_matmul_hands_every_cast_weight_back(comfyui, monkeypatch):
    """`comfy/ops.py` 0271a46: ``cast_bias_weight(s, input, ..., offloadable=True)`` returns the weight, the
    bias and a token; ``uncast_bias_weight(s, weight, bias, token)`` releases the weight's VRAM (under dynamic
    VRAM it stays pinned until then)."""
    import comfy.ops

    from step1x_core.ops import fp8_matmul_available

    if not fp8_matmul_available("cpu"):
        pytest.skip(f"torch {torch.__version__} has no CPU fp8 _scaled_mm kernel")
    fp8_ops = pack_module("fp8_ops")
    real_cast = comfy.ops.cast_bias_weight
    held, casts = set(), []

    def cast_bias_weight(s, input=None, dtype=None, device=None, bias_dtype=None, offloadable=False, **kwargs):
        weight, bias = real_cast(s, input, dtype=dtype, device=device, bias_dtype=bias_dtype)[:2]
        casts.append(offloadable)
        token = object()
        held.add(token)
        return (weight, bias, token) if offloadable else (weight, bias)

    def uncast_bias_weight(s, weight, bias, offload_stream):
        held.remove(offload_stream)

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", cast_bias_weight)
    monkeypatch.setattr(comfy.ops, "uncast_bias_weight", uncast_bias_weight, raising=False)
    layer = fp8_ops.Fp8MatmulOps.Linear(32, 48)
    layer.weight = torch.nn.Parameter(torch.randn(48, 32).to(torch.float8_e4m3fn), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(48), requires_grad=False)
    layer.comfy_cast_weights = True
    out = layer(torch.randn(3, 32))
    assert out.shape == (3, 48) and casts == [True] and not held


# ---- the Qwen encoder's patcher -------------------------------------------------------------------------
def test_qwen_encoder_gets_comfyuis_core_patcher(comfyui, monkeypatch):
    """`comfy/sd.py` 033046c gives text encoders ``comfy.model_patcher.CoreModelPatcher``, which `main.py`
    02018c7 makes ``ModelPatcherDynamic`` when dynamic VRAM is on; the Qwen encoder gets the same class, and
    the classic ModelPatcher where ComfyUI has no CoreModelPatcher."""
    import comfy.model_patcher

    qwen = pack_module("qwen_encoder")
    if not hasattr(comfy.model_patcher, "CoreModelPatcher"):
        assert qwen.patcher_class() is comfy.model_patcher.ModelPatcher

    class Recorded(comfy.model_patcher.ModelPatcher):
        pass

    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", Recorded, raising=False)
    encoder = qwen.load_qwen_encoder(QWEN_FOLDER)
    assert type(encoder.patcher) is Recorded


# ---- FLUX's block protocol --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampler_inputs(comfyui):
    """The Step1X-Edit graph up to the sampler, run node by node: (model, positive, negative, reference)."""
    import nodes as comfy_nodes

    image = comfy_nodes.LoadImage().load_image("cat.png")[0]
    image = comfyui.node_class("Step1XEditImageScale").execute(image, "custom", SIZE, "bicubic").result[0]
    model = comfyui.node_class("Step1XEditDiTLoader").execute(V11_DIT, "default", "auto").result[0]
    qwen = comfyui.node_class("Step1XEditQwenVLLoader").execute(QWEN_FOLDER, "auto", "default").result[0]
    embeddings = comfyui.node_class("Step1XEditQwenVLEncode").execute(qwen, image, "add a red hat", "").result[0]
    positive, negative = comfyui.node_class("Step1XEditConnector").execute(model, embeddings).result
    vae = comfy_nodes.VAELoader().load_vae(VAE)[0]
    reference = comfy_nodes.VAEEncode().encode(vae, image)[0]
    return model, positive, negative, reference


def _sample(comfyui, inputs, model=None) -> torch.Tensor:
    base, positive, negative, reference = inputs
    out = comfyui.node_class("Step1XEditSampler").execute(model or base, positive, negative, reference, 3, 2, 4.0,
                                                          0.93, 1.0).result[0]
    return out["samples"]


def test_blocks_see_their_type_index_and_count(comfyui, sampler_inputs):
    """As FLUX's block loop since 0.3.75: while a block runs, transformer_options holds ``block_type``,
    ``block_index`` and ``total_blocks`` (of that type); a replaced block's patch sees them too."""
    model = sampler_inputs[0].clone()
    params = model.model.diffusion_model.params
    seen = []

    def record(args, extra):
        options = args["transformer_options"]
        seen.append((options["block_type"], options["block_index"], options["total_blocks"]))
        return extra["original_block"](args)

    for kind, count in (("double_block", params.depth), ("single_block", params.depth_single_blocks)):
        for index in range(count):
            model.set_model_patch_replace(record, "dit", kind, index)
    plain = _sample(comfyui, sampler_inputs)
    assert relative_error(_sample(comfyui, sampler_inputs, model), plain) <= BIT_EXACT  # observing changes nothing
    per_call = [("double", i, params.depth) for i in range(params.depth)] + \
               [("single", i, params.depth_single_blocks) for i in range(params.depth_single_blocks)]
    assert seen[:len(per_call)] == per_call and len(seen) % len(per_call) == 0


def test_post_input_patches_see_and_change_the_streams(comfyui, sampler_inputs):
    """FLUX's ``post_input`` patches: called with img, txt and their ids after the input layers; what they
    return is what the blocks get."""
    model = sampler_inputs[0].clone()
    seen = []

    def observe(streams):
        seen.append({key: tuple(value.shape) for key, value in streams.items() if torch.is_tensor(value)})
        assert isinstance(streams["transformer_options"], dict)
        return streams

    model.model_options["transformer_options"].setdefault("patches", {})["post_input"] = [observe]
    plain = _sample(comfyui, sampler_inputs)
    assert relative_error(_sample(comfyui, sampler_inputs, model), plain) <= BIT_EXACT
    assert seen and set(seen[0]) == {"img", "txt", "img_ids", "txt_ids"}
    assert seen[0]["img"][1] == seen[0]["img_ids"][1] and seen[0]["txt"][1] == seen[0]["txt_ids"][1]

    def quieten(streams):
        return {**streams, "txt": streams["txt"] * 0.5}

    changed = sampler_inputs[0].clone()
    changed.model_options["transformer_options"].setdefault("patches", {})["post_input"] = [quieten]
    assert relative_error(_sample(comfyui, sampler_inputs, changed), plain) > 1e-3


def test_rope_options_move_the_edited_image_only(comfyui, sampler_inputs):
    """``rope_options`` (ScaleROPE, ModelPatcher.set_model_rope_options): identity options change nothing, a
    shift changes the result, as FLUX's process_img applies them to the generated image's ids."""
    plain = _sample(comfyui, sampler_inputs)
    identity = sampler_inputs[0].clone()
    identity.model_options["transformer_options"]["rope_options"] = {
        "scale_x": 1.0, "shift_x": 0.0, "scale_y": 1.0, "shift_y": 0.0, "scale_t": 1.0, "shift_t": 0.0}
    assert relative_error(_sample(comfyui, sampler_inputs, identity), plain) <= BIT_EXACT
    shifted = sampler_inputs[0].clone()
    shifted.model_options["transformer_options"]["rope_options"] = {"shift_x": 3.0, "scale_y": 0.5}
    assert relative_error(_sample(comfyui, sampler_inputs, shifted), plain) > 1e-3


def test_target_ids_follow_fluxs_process_img(comfyui):
    """The edited image's ids are those FLUX's `process_img` (`comfy/ldm/flux/model.py`) gives the image it
    generates, with ``rope_options`` where this ComfyUI's FLUX takes them (0.3.75 and later)."""
    from types import SimpleNamespace

    import comfy.ldm.flux.model

    comfy_model = pack_module("comfy_model")
    process_img = comfy.ldm.flux.model.Flux.process_img
    flux = SimpleNamespace(patch_size=2, params=SimpleNamespace(axes_dim=[16, 56, 56]))
    latent = torch.zeros(2, 16, 8, 12)
    options = [None]
    if "transformer_options" in inspect.signature(process_img).parameters:
        options.append({"shift_t": 1.0, "scale_y": 2.0, "shift_y": 0.5, "scale_x": 0.5, "shift_x": -1.0})
    for rope_options in options:
        kwargs = {"transformer_options": {"rope_options": rope_options}} if rope_options else {}
        _, expected = process_img(flux, latent, **kwargs)
        assert torch.equal(comfy_model.target_ids(8, 12, 2, rope_options, "cpu"), expected), rope_options


# ---- ComfyUI's quantized formats ----------------------------------------------------------------------------
def _quantized_file(path, fmt: str) -> None:
    """The tiny v1.1 DiT with its block Linear weights in float8_e4m3fn and per-tensor scales, in one of ComfyUI's
    quantized formats ("bf16": none): "scaled_fp8" (``scale_weight`` + a ``scaled_fp8`` marker, read since 0.3.x) or
    "mixed_precision" (``weight_scale`` + the file metadata's ``_quantization_metadata``, QUANTIZATION.md in
    0.3.75)."""
    import json

    from safetensors.torch import save_file

    from step1x_core.testing.factory import TEXT_GAIN

    sd = tiny_dit_state_dict(tiny_dit_params("v1.1", 64), seed=0, text_gain=TEXT_GAIN)
    out, layers = {}, {}
    for key, tensor in sd.items():
        tensor = tensor.to(torch.bfloat16)
        quantize = fmt != "bf16" and key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight")
        if quantize and tensor.ndim == 2:
            scale = tensor.float().abs().amax() / 448
            out[key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
            layer = key.removesuffix(".weight")
            out[f"{layer}.{'scale_weight' if fmt == 'scaled_fp8' else 'weight_scale'}"] = scale.float()
            layers[layer] = {"format": "float8_e4m3fn"}
        else:
            out[key] = tensor
    metadata = None
    if fmt == "bf16":
        pass
    elif fmt == "scaled_fp8":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    else:
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file(out, str(path), metadata=metadata)


def test_comfyuis_quantized_formats_load_through_both_loaders(comfyui, monkeypatch):
    """A Step1X-Edit file in ComfyUI's own quantized formats (each one this ComfyUI reads) loads through Load
    Step1X-Edit DiT as through native Load Diffusion Model: ComfyUI's quantized layers, the same model (1e-6),
    and within fp8's error of the bf16 file."""
    import comfy.model_management
    import comfy.ops

    formats = ["scaled_fp8"] + (["mixed_precision"] if hasattr(comfy.ops, "mixed_precision_ops") else [])
    loader, native = comfyui.node_class("Step1XEditDiTLoader"), comfyui.node_class("UNETLoader")()
    _quantized_file(comfyui.models / "diffusion_models" / "quantized-bf16.safetensors", "bf16")
    comfyui.invalidate_file_lists()
    reference = model_velocity(loader.execute("quantized-bf16.safetensors", "bf16", "auto").result[0])
    for fmt in formats:
        name = f"quantized-{fmt}.safetensors"
        _quantized_file(comfyui.models / "diffusion_models" / name, fmt)
        comfyui.invalidate_file_lists()
        ours = loader.execute(name, "default", "auto").result[0]
        theirs = native.load_unet(name, "default")[0]
        qkv = ours.model.diffusion_model.double_blocks[0].img_attn.qkv
        assert type(qkv).__qualname__ == type(theirs.model.diffusion_model.double_blocks[0].img_attn.qkv).__qualname__
        assert type(qkv).__module__ == "comfy.ops", f"{fmt}: {type(qkv)} is not one of ComfyUI's layers"
        velocity = model_velocity(ours)
        assert relative_error(velocity, model_velocity(theirs)) <= BIT_EXACT, fmt
        assert 0 < relative_error(velocity, reference) < 0.1, fmt
        # fp8_e4m3fn_fast on a device that computes in fp8: ComfyUI's quantized layers still read the scales
        with monkeypatch.context() as patch:
            patch.setattr(comfy.model_management, "SUPPORT_FP8_OPS", True)
            fast = model_velocity(loader.execute(name, "fp8_e4m3fn_fast", "auto").result[0])
        assert relative_error(fast, reference) < 0.15, fmt
