"""Quantized Step1X-Edit DiT files: written tensor by tensor from the release files (`quantize_dit`), and read
back by the engine (`engine`). Two formats, for the two ways ComfyUI users load small weights:

- ComfyUI's mixed-precision fp8 safetensors (QUANTIZATION.md, ComfyUI 0.3.75+): float8_e4m3fn weights with a
  per-tensor ``weight_scale`` and ``_quantization_metadata`` naming the quantized layers;
- GGUF (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1) as ComfyUI-GGUF's Unet Loader (GGUF) reads it (``general.architecture``
  flux, original-layout tensor names; ComfyUI's detection then tells Step1X-Edit by its tensors).
"""

from .core import FORMATS, QuantizeReport, quantize_dit

__all__ = ["FORMATS", "QuantizeReport", "quantize_dit"]
