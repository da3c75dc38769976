"""The denoising loop: Euler steps along the rectified flow, with classifier-free guidance.

One loop for every flow (BFL's shape: the variants are prepared before it). A ``Flow`` supplies what the two
references do differently: the schedule, the time the model is given, the order of the guidance arithmetic,
the Euler step's precision, and whether cond and uncond share one DiT call. The loop supplies the rest:
reference tokens appended before every call, CFG truncation, the step cache, the NaN stop and the callback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

from ..dit.connector import ConnectorContext
from ..dit.model import StepCache
from ..finite import NonFiniteError, all_finite, describe_non_finite

StepCallback = Callable[[int, int, Tensor], None]  # (step index, total steps, current target tokens)


@dataclass
class DiTText:
    """An encoded prompt as the DiT reads it, for a batch of B prompts: the connector's t-independent context
    and the text stream's RoPE ids [B, T, 3] (zeros for v1.0/v1.1, positions for v1.2)."""

    ctx: ConnectorContext
    txt_ids: Tensor

    @property
    def tokens(self) -> int:
        return self.txt_ids.shape[1]

    def select(self, index: int) -> DiTText:
        """One prompt of the batch (e.g. the conditional one of [cond, uncond])."""
        return DiTText(self.ctx.select(index), self.txt_ids[index:index + 1])

    @staticmethod
    def batch(first: DiTText, second: DiTText) -> DiTText:
        """Two prompts of the same length as one batch [first, second] (one DiT call for both)."""
        ctx = ConnectorContext(*(torch.cat([a, b]) for a, b in zip(
            (first.ctx.tokens, first.ctx.context, first.ctx.attn_mask, first.ctx.y),
            (second.ctx.tokens, second.ctx.context, second.ctx.attn_mask, second.ctx.y))))
        if first.ctx.mapped is not None and second.ctx.mapped is not None:
            ctx.mapped = torch.cat([first.ctx.mapped, second.ctx.mapped])
        return DiTText(ctx, torch.cat([first.txt_ids, second.txt_ids]))


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: ``scale`` 1 = off; the difference is rescaled per token while t (in [0, 1]) >
    ``norm_threshold``; ``cfg_steps`` (optional, lossy) guides the first N steps only, then runs the
    conditional branch alone (CFG truncation)."""

    scale: float = 6.0
    norm_threshold: float = 0.93
    cfg_steps: int | None = None

    def active(self, step: int) -> bool:
        return self.scale != 1.0 and (self.cfg_steps is None or step < self.cfg_steps)


class Flow(Protocol):
    """A reference's schedule and arithmetic over ``steps`` steps (see ``official`` and ``diffusers``)."""

    steps: int
    batched_guidance: bool  # cond and uncond in one DiT call (same text length), or one call each

    def t(self, step: int) -> float:
        """The time of ``step`` in [0, 1] (1 = noise), as the guidance threshold reads it."""

    def model_time(self, step: int, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The DiT's timesteps [batch] at ``step``."""

    def guide(self, cond: Tensor, uncond: Tensor, guidance: Guidance, step: int) -> Tensor:
        """The guided velocity at ``step``, in the reference's order of operations (and its reading of the
        norm threshold)."""

    def step(self, sample: Tensor, velocity: Tensor, step: int) -> Tensor:
        """One Euler step from ``step`` to ``step + 1``."""

    def start(self, noise: Tensor, reference: Tensor, strength: float) -> tuple[int, Tensor]:
        """img2img: the first step to run for ``strength`` in (0, 1] and the starting tokens."""


def denoise(model, flow: Flow, target: Tensor, img_ids: Tensor, cond: DiTText, uncond: DiTText | None = None,
            guidance: Guidance = Guidance(), reference: Tensor | None = None, first_step: int = 0,
            new_cache: Callable[[], StepCache] | None = None, callback: StepCallback | None = None) -> Tensor:
    """Euler integration of ``flow`` from ``first_step`` to its end on packed target tokens [1, L, 64].

    ``reference`` tokens (an edit) are appended unchanged before every call; ``img_ids`` cover [target |
    reference]. ``uncond`` None (or guidance scale 1) runs the conditional branch alone. ``new_cache``
    (optional, lossy) makes the first-block ``StepCache`` of each DiT call of a step. Stops at the first step
    whose velocity holds NaN/Inf (it could only end in a broken image). The callback and messages count the
    steps run (from ``first_step``). Returns the target tokens.
    """
    n_target, total = target.shape[1], flow.steps - first_step
    guided = uncond is not None and guidance.active(first_step)
    calls = _calls(flow, cond, uncond) if guided else [cond]
    caches = [new_cache() if new_cache else None for _ in calls]
    for i in range(first_step, flow.steps):
        if guided and not guidance.active(i):  # CFG truncation: the conditional branch alone from here on
            guided, calls, caches = False, [cond], caches[:1]
        img = target if reference is None else torch.cat([target, reference], dim=1)
        preds = []
        for text, cache in zip(calls, caches):
            batch = text.txt_ids.shape[0]
            timestep = flow.model_time(i, batch, target.dtype, target.device)
            pred = model.forward_context(img.expand(batch, -1, -1), img_ids[:1].expand(batch, -1, -1), text.txt_ids,
                                         timestep, text.ctx, cache=cache)[:, :n_target]
            if not all_finite(pred):
                raise NonFiniteError(explain_non_finite_step(i - first_step, total, flow.t(i), img, text.ctx, model))
            preds.extend(pred.split(1))
        velocity = flow.guide(preds[0], preds[1], guidance, i) if guided else preds[0]
        target = flow.step(target, velocity, i)
        if callback is not None:
            callback(i - first_step, total, target)
    return target


def _calls(flow: Flow, cond: DiTText, uncond: DiTText | None) -> list[DiTText]:
    """The prompts of each DiT call per step: [cond], [cond | uncond] batched, or [cond], [uncond]."""
    if uncond is None:
        return [cond]
    if flow.batched_guidance:
        if cond.tokens != uncond.tokens:
            raise ValueError(f"batched guidance needs cond and uncond of one length, got {cond.tokens} and "
                             f"{uncond.tokens} text tokens")
        return [DiTText.batch(cond, uncond)]
    return [cond, uncond]


def explain_non_finite_step(step: int, total: int, t: float, img: Tensor, ctx: ConnectorContext,
                            dit: nn.Module | None = None) -> str:
    """Why the DiT's velocity at ``step`` holds NaN/Inf."""
    return f"step {step + 1} of {total} (t={t:.3f}): " + non_finite_cause(img, (ctx.tokens, ctx.context, ctx.y), dit)


def non_finite_cause(img: Tensor, text: Sequence[Tensor] = (), dit: nn.Module | None = None) -> str:
    """Why a DiT call gave NaN/Inf: the first of its inputs (latent, text conditioning) or of the ``dit``'s
    weights that already held them, else its arithmetic. Used by every sampler: the engine's loop and the
    guard on ComfyUI's samplers."""
    if not all_finite(img):
        return (f"the latent entering the DiT holds {describe_non_finite(img)}; the likely cause is the reference "
                "latent (the VAE encode of the input image) or the starting latent")
    if not all(all_finite(part) for part in text):
        return ("the instruction's conditioning holds NaN/Inf; the likely cause is the text encoder's output "
                "(float16 overflows: use bfloat16 or float32)")
    bad = next((name for name, p in dit.named_parameters() if not all_finite(p)), None) if dit is not None else None
    if bad:
        return (f"the DiT's weights hold NaN/Inf (e.g. {bad}) although the file was checked when loaded: a LoRA or "
                "other weight patch brought them in, or they were changed after loading; check its file and strength")
    return ("the DiT's velocity holds NaN/Inf although its inputs and weights were finite; the likely cause is the "
            "DiT's arithmetic (float16 overflows: use bfloat16 or float32) or a weight patch applied per layer")
