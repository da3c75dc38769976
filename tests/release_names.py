"""The released files' names, as the tests use them, taken from the engine's release table
(`step1x_core/release_files.py`), so a renamed release file is changed there only. make_tiny writes the
tiny models under these names; the unpacking below fails at import if the table gains or loses a file
of a role, so the tests are looked at again then."""

from __future__ import annotations

from step1x_core.release_files import DIT_RELEASE, RELEASE_FILES
from step1x_core.versions import Version


def _names(role: str) -> list[str]:
    return [f.name for f in RELEASE_FILES if f.role == role]


V11_DIT = DIT_RELEASE[Version.V1_1]
V10_DIT = DIT_RELEASE[Version.V1_0]
V12_DIT = DIT_RELEASE[Version.V1_2]  # the v1.2 release's transformer/ folder, as step1x-edit-download places it
_, _, V10_FP8_DIT, _ = _names("dit")
# The Hugging Face folder, ComfyUI's single files (bf16, fp8 scaled: make_tiny writes the fp8 one), v1.2's own.
QWEN_FOLDER, QWEN_FILE, QWEN_FP8_FILE, V12_QWEN = _names("text_encoder")
VAE, STEPFUN_VAE = _names("vae")  # FLUX.1's ae.safetensors (make_tiny's), Step1X-Edit's vae.safetensors
(LORA,) = _names("lora")
V12_RELEASE = V12_DIT.split("/")[0]  # the v1.2 release's folder, holding transformer/ and text_encoder/
