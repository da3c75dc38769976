"""fp8 matmul for the DiT's Linear layers inside ComfyUI, on ComfyUI's own layers and weight-cast protocol.

ComfyUI's own fp8 ops clip activations to +-448 and flush those below e4m3's smallest values; these scale the
activation into e4m3's range instead (``step1x_core.ops.fp8_linear``). The weight comes from ComfyUI's
``cast_bias_weight`` and, where ComfyUI has it (0.3.75 and later), goes back through ``uncast_bias_weight``:
under dynamic VRAM (0.38) the cast pins the weight's VRAM until it is uncast.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

import comfy.ops

from ..step1x_core.ops import fp8_linear, fp8_linear_fits


@contextmanager
def cast_weights(layer, input: torch.Tensor, dtype: torch.dtype, bias_dtype: torch.dtype):
    """(weight, bias) of ``layer`` on the input's device, released when the block ends."""
    uncast = getattr(comfy.ops, "uncast_bias_weight", None)
    if uncast is None:  # ComfyUI before 0.3.75: the cast holds nothing that needs handing back
        yield comfy.ops.cast_bias_weight(layer, input, dtype=dtype, bias_dtype=bias_dtype)[:2]
        return
    weight, bias, offload_stream = comfy.ops.cast_bias_weight(layer, input, dtype=dtype, bias_dtype=bias_dtype,
                                                              offloadable=True)
    try:
        yield weight, bias
    finally:
        uncast(layer, weight, bias, offload_stream)


class Fp8MatmulOps(comfy.ops.manual_cast):
    """ComfyUI's manual-cast layers, with float8_e4m3fn Linear weights multiplied in fp8 (torch._scaled_mm)."""

    class Linear(comfy.ops.manual_cast.Linear):
        def forward_comfy_cast_weights(self, input, *args, **kwargs):
            # A LoRA's weight functions patch the weight in the compute dtype: that path is ComfyUI's own.
            if self.weight.dtype == torch.float8_e4m3fn and not self.weight_function and not self.bias_function \
                    and fp8_linear_fits(input, self.weight):
                with cast_weights(self, input, self.weight.dtype, input.dtype) as (weight, bias):
                    return fp8_linear(input, weight, bias)
            return super().forward_comfy_cast_weights(input, *args, **kwargs)
