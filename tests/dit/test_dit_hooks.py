"""The DiT's host hooks: a block hook that sees every block with FLUX's argument names, and attention
options that reach the attention function (what ComfyUI's block patches and transformer_options need)."""

from __future__ import annotations

import torch

from step1x_core.sampling.latents import edit_ids
from step1x_core.dit.attention import sdpa_attention
from step1x_core.dit.model import Step1XEditDiT, StepCache, run_block
from step1x_core.testing.tiny_dit import tiny_dit_params, tiny_dit_state_dict


def _model_and_inputs(depth: int = 2, single: int = 2):
    params = tiny_dit_params("v1.1")
    params = type(params)(**{**params.__dict__, "depth": depth, "depth_single_blocks": single})
    model = Step1XEditDiT(params).eval()
    model.load_state_dict(tiny_dit_state_dict(params))
    gen = torch.Generator().manual_seed(3)
    ctx = model.connector.precompute(torch.randn(2, 12, params.connector.in_channels, generator=gen),
                                     torch.ones(2, 12, dtype=torch.long))
    img = torch.randn(2, 32, params.in_channels, generator=gen)
    img_ids, txt_ids = edit_ids(8, 8, 2, "v1.1", 12)
    return model, (img, img_ids, txt_ids, torch.full((2,), 0.6), ctx)


@torch.inference_mode()
def test_hook_sees_every_block_in_order_and_a_pass_through_hook_changes_nothing():
    model, inputs = _model_and_inputs()
    calls = []

    def hook(kind, index, block, args):
        calls.append((kind, index, sorted(args)))
        return run_block(block, args)

    torch.testing.assert_close(model.forward_context(*inputs, block_hook=hook), model.forward_context(*inputs),
                               rtol=0, atol=0)
    assert calls == [("double_block", 0, ["img", "pe", "txt", "vec"]), ("double_block", 1, ["img", "pe", "txt", "vec"]),
                     ("single_block", 0, ["img", "pe", "vec"]), ("single_block", 1, ["img", "pe", "vec"])]


@torch.inference_mode()
def test_a_hook_can_skip_or_replace_one_block():
    model, inputs = _model_and_inputs()
    plain = model.forward_context(*inputs)
    for kind in ("double_block", "single_block"):
        skip = lambda k, i, block, args, kind=kind: dict(args) if (k, i) == (kind, 1) else run_block(block, args)
        skipped = model.forward_context(*inputs, block_hook=skip)
        assert (skipped - plain).abs().max() > 1e-3, kind


@torch.inference_mode()
def test_attention_options_reach_the_attention_function():
    model, inputs = _model_and_inputs(depth=1, single=1)
    seen = []

    def recording(q, k, v, heads, mask=None, skip_reshape=True, **options):
        seen.append(options)
        return sdpa_attention(q, k, v, heads, mask, skip_reshape)

    model.set_attention(recording)
    model.forward_context(*inputs, attn_options={"transformer_options": {"marker": 1}})
    assert seen == [{"transformer_options": {"marker": 1}}] * 2


@torch.inference_mode()
def test_step_cache_goes_through_the_hook_too():
    model, inputs = _model_and_inputs()
    kinds = []
    cache = StepCache(threshold=10.0)  # reuse whenever possible
    hook = lambda kind, index, block, args: kinds.append((kind, index)) or run_block(block, args)
    model.forward_context(*inputs, cache=cache, block_hook=hook)
    model.forward_context(*inputs, cache=cache, block_hook=hook)
    assert cache.hits == 1 and kinds[-1] == ("double_block", 0)  # the second call stopped after the first block
