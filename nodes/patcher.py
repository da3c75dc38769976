"""What the LoRAs applied to a Step1X-Edit MODEL really changed, read off ComfyUI's own ModelPatcher.

ComfyUI's LoRA loaders drop the keys that match nothing before they patch, and say so only in the server log,
so a LoRA for another model ran as a "success" that changed nothing. Every weight patch renews the patcher's
``patches_uuid`` (and clones copy it); the loader records the one it started with, so the sampler can tell
"patches were added" from "none were", and count the DiT weights that carry one: all LoRAs together, so a
second LoRA that matches nothing, next to one that matches, is not told apart. ComfyUI chooses the patcher
class (dynamic VRAM in 0.38), so this reads it rather than subclassing it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

LOADED = "step1x_loaded"  # attachment: (the patcher the loader returned, weakly; its patches_uuid then)


@dataclass(frozen=True)
class PatchReport:
    patched: int  # DiT weights that carry a weight patch
    strengths: tuple[float, ...]  # the patches' strengths, distinct, in order


def mark_loaded(patcher) -> None:
    patcher.attachments[LOADED] = (weakref.ref(patcher), patcher.patches_uuid)


def _other_uuid_changes(patcher) -> bool:
    """What else renews patches_uuid: weight wrappers, hook patches, a compute-dtype change."""
    return bool(getattr(patcher, "weight_wrapper_patches", None) or getattr(patcher, "hook_patches", None)
                or "manual_cast_dtype" in getattr(patcher, "object_patches", {}))


def patch_report(patcher) -> PatchReport | None:
    """None when no weight patch was applied since loading; else how many DiT weights carry one."""
    loaded = getattr(patcher, "attachments", {}).get(LOADED)
    # The loader's own patcher carries no LoRA (LoRA loaders clone); ComfyUI may renew its uuid for hooks.
    if loaded is None or loaded[0]() is patcher or patcher.patches_uuid == loaded[1]:
        return None
    patches = patcher.patches
    if not patches and _other_uuid_changes(patcher):
        return None
    strengths = tuple(dict.fromkeys(entry[0] for entries in patches.values() for entry in entries))
    return PatchReport(len(patches), strengths)
