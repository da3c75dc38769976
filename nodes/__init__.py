"""The Step1X-Edit ComfyUI nodes: thin adapters over `step1x_core`."""

from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .conditioning import Step1XEditConnector, Step1XEditQwenVLEncode
from .detection import register_model_detection
from .guidance import Step1XEditNormalizedCFG
from .image import Step1XEditImageScale, Step1XEditMaskedPaste, Step1XEditRestoreSize
from .loaders import Step1XEditDiTLoader, Step1XEditQwenVLLoader
from .reasoning import Step1XEditReflect, Step1XEditThink
from .sampler import Step1XEditSampler
from .scheduler import Step1XEditScheduler

NODES = [
    Step1XEditDiTLoader,
    Step1XEditQwenVLLoader,
    Step1XEditQwenVLEncode,
    Step1XEditConnector,
    Step1XEditImageScale,
    Step1XEditSampler,
    Step1XEditRestoreSize,
    Step1XEditScheduler,
    Step1XEditNormalizedCFG,
    Step1XEditMaskedPaste,
    Step1XEditThink,
    Step1XEditReflect,
]


class Step1XEditExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # Here rather than in on_load, which ComfyUI 0.3.64 never calls; registering twice is a no-op.
        register_model_detection()
        return NODES
