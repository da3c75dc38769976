"""ComfyUI's ModelPatcher for the Step1X-Edit DiT, noting what each weight patch (a LoRA) really changed.

ComfyUI's LoRA loaders drop the keys that match nothing before they patch, and say so only in the server log,
so a LoRA for another model ran as a "success" that changed nothing. ``add_patches`` is where every loader's
patches arrive; here it also records how many weights they reached, for the sampler to show in the UI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_patcher

logger = logging.getLogger(__name__)

REPORTS = "step1x_patch_reports"  # attachment key: a tuple of PatchReport, copied along with every clone


@dataclass(frozen=True)
class PatchReport:
    patched: int  # model weights this add_patches call reached
    strength: float
    strength_model: float


class Step1XEditModelPatcher(comfy.model_patcher.ModelPatcher):
    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        patched = super().add_patches(patches, strength_patch, strength_model)
        report = PatchReport(len(patched), strength_patch, strength_model)
        self.attachments[REPORTS] = (*self.attachments.get(REPORTS, ()), report)  # a new tuple: clones keep theirs
        if not patched:
            logger.warning("Step1X-Edit: a LoRA or weight patch matched none of the DiT's weights (0 patched); "
                           "it is for another model, or its key names are not ones this model knows")
        return patched


def patch_reports(patcher) -> tuple[PatchReport, ...]:
    return tuple(getattr(patcher, "attachments", {}).get(REPORTS, ()))
