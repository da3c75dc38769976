"""Make a CUDA-built torchvision importable next to the CPU torch wheel (test machines only).

The registries' torchvision wheel is linked against CUDA torch. With the CPU torch wheel its
import dies registering fake kernels for `torchvision::nms` / `qnms`, operators its C extension
would have defined. ComfyUI and transformers import torchvision, so the tests define the two
operator schemas first; no torchvision kernel is used by ComfyUI's core or by this pack.
A machine with a matching torchvision is left untouched.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import torch

SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
           "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None  # kept alive: the definitions vanish with the Library object


def torchvision_breaks_on_import() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    return probe.returncode != 0 and "torchvision::nms" in probe.stderr


def apply() -> bool:
    """Define the missing operator schemas if torchvision needs them; True if it did."""
    global _library
    if _library is not None or torch.version.cuda is not None or not torchvision_breaks_on_import():
        return False
    _library = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        _library.define(schema)
    return True
