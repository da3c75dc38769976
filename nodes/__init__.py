"""The Step1X-Edit ComfyUI nodes: thin adapters over `step1x_core`."""

from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .conditioning import Step1XEditConnector, Step1XEditQwenVLEncode
from .image import Step1XEditImageScale, Step1XEditRestoreSize
from .loaders import Step1XEditDiTLoader, Step1XEditQwenVLLoader
from .sampler import Step1XEditSampler

NODES = [
    Step1XEditDiTLoader,
    Step1XEditQwenVLLoader,
    Step1XEditQwenVLEncode,
    Step1XEditConnector,
    Step1XEditImageScale,
    Step1XEditSampler,
    Step1XEditRestoreSize,
]


class Step1XEditExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
