"""Files packaged with the engine for Qwen2.5-VL: the tokenizer and model config that ComfyUI's single-file
encoders lack, and Step1X-Edit's instruction prefix."""

from __future__ import annotations

from pathlib import Path

# Found from this file, never by the package's top-level name: inside ComfyUI the engine is
# `<pack folder>.step1x_core`, and `import step1x_core` fails there.
ASSETS = Path(__file__).resolve().parent / "assets"
PACKAGED_CONFIG = ASSETS / "qwen25_vl_7b"  # config + image processor of Qwen2.5-VL-7B-Instruct
PACKAGED_TOKENIZER = ASSETS / "qwen25_tokenizer"  # = ComfyUI's qwen25_tokenizer
PREFIX_FILE = ASSETS / "qwen_prefix.txt"
