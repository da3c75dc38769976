"""The pack's own socket types (everything else is a native ComfyUI type)."""

from comfy_api.latest import io

QwenVL = io.Custom("STEP1X_QWEN_VL")  # a loaded Qwen2.5-VL encoder
QwenEmbeds = io.Custom("STEP1X_QWEN_EMBEDS")  # its hidden states + masks for the instruction and the negative

CATEGORY = "Step1X-Edit"
