"""The quantized formats' errors against bf16 as the benchmark measured them, and what the tests allow."""

# One DiT call's relative error against bf16 on the tiny v1.1 DiT: what the benchmark measured
# (benchmarks/quantize.py; README, Low VRAM) plus 25% for other CPUs' rounding.
MEASURED_CALL_ERROR = {"fp8": 0.059, "q8_0": 0.0081, "q5_0": 0.068, "q5_1": 0.058, "q4_0": 0.121, "q4_1": 0.129}
CALL_ERROR = {fmt: 1.25 * error for fmt, error in MEASURED_CALL_ERROR.items()}
# A whole edit (step1x-edit, 2 steps, 64 px, tiny models): the edited image's relative error against the bf16
# edit, as the benchmark measured it; the tests allow twice that (ComfyUI's loaders compute differently).
MEASURED_EDIT_ERROR = {"fp8": 0.023, "q8_0": 0.0033, "q5_0": 0.020, "q5_1": 0.017, "q4_0": 0.044, "q4_1": 0.034}
EDIT_ERROR = {fmt: 2 * error for fmt, error in MEASURED_EDIT_ERROR.items()}
