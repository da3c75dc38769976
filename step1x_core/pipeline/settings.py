"""What one edit or picture is asked for, checked before anything runs."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from ..dit.model import StepCache
from ..finite import require_finite_number
from ..images.sizing import MAX_SIZE_LEVEL, MULTIPLE, resample_filter
from ..sampling.loop import Guidance


# Upper bounds, checked with the other settings before any model loads. The reference runs 28 steps and up
# to 3 reflection rounds; past these a run only burns hours (each step is a full DiT pass, each round one more
# edit plus up to five MLLM answers) without changing the picture. The largest size level is the image code's.
MAX_STEPS = 1000
MAX_REFLECT_ROUNDS = 10


@dataclass
class EditSettings:
    steps: int = 28
    cfg_scale: float = 6.0
    seed: int = 0
    size_level: int = 1024
    negative: str = ""
    # CFG is rescaled per token while t (in [0, 1]) > this; 1.0 = never (v1.0's code). None: the flow's
    # reference, 0.93 for v1.0/v1.1 edits (the later official code), every step (0.00093) for v1.2 and
    # text-to-image, whose reference compares its 0..1000 timestep with 0.93.
    norm_cfg_threshold: float | None = None
    strength: float = 1.0  # img2img: < 1 starts from the noised input image
    resample: str = "bicubic"  # input resize filter: bicubic (v1.0) or lanczos (later code)
    restore_size: bool = True  # v1.0 resizes the result back to the input's size
    # Speed options, off by default because they change the result (measured by step1x_core.commands.bench):
    cfg_steps: int | None = None  # CFG on the first N steps only, then the conditional branch alone
    step_cache: float | None = None  # first-block step cache threshold (e.g. 0.05)
    # v1.2 only: the MLLM rewrites the instruction first (think), judges each edit and re-edits for up to
    # `reflect` rounds (the reference's default when on: 3; 0 = off).
    think: bool = False
    reflect: int = 0
    # The reference's judging budget: tries per judge stage before its fallback verdict, and new tokens per
    # MLLM answer. Lower values trade the judge's reliability for speed.
    judge_tries: int = 20
    reasoning_tokens: int = 128

    def validate(self) -> None:
        # NaN passes every < and > below (all comparisons with it are false): refuse it by name first.
        for name in ("cfg_scale", "strength", "norm_cfg_threshold", "step_cache"):
            require_finite_number(name, getattr(self, name))
        for name in ("steps", "size_level", "seed", "cfg_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be between 0 and 2**64 - 1, got {self.seed}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be between 1 and {MAX_STEPS} (28 is the official setting), got {self.steps}")
        if self.cfg_scale < 1.0:
            raise ValueError(f"cfg must be >= 1.0 (1 disables guidance), got {self.cfg_scale}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if not MULTIPLE <= self.size_level <= MAX_SIZE_LEVEL:
            raise ValueError(f"size_level must be between {MULTIPLE} and {MAX_SIZE_LEVEL} (1024 is the official "
                             f"setting), got {self.size_level}")
        resample_filter(self.resample)
        if self.cfg_steps is not None and self.cfg_steps < 0:
            raise ValueError(f"cfg_steps must be >= 0, got {self.cfg_steps}")
        if self.step_cache is not None and self.step_cache <= 0:
            raise ValueError(f"step_cache threshold must be > 0, got {self.step_cache}")
        if not 0 <= self.reflect <= MAX_REFLECT_ROUNDS:
            raise ValueError(f"reflect must be between 0 (off) and {MAX_REFLECT_ROUNDS} rounds (the reference: 3), "
                             f"got {self.reflect}")
        if self.judge_tries < 1 or self.reasoning_tokens < 1:
            raise ValueError(f"judge_tries and reasoning_tokens must be at least 1, got {self.judge_tries} and "
                             f"{self.reasoning_tokens}")
        if self.norm_cfg_threshold is not None and not 0.0 <= self.norm_cfg_threshold <= 1.0:
            raise ValueError(f"norm_cfg_threshold must be in [0, 1] (t's scale), got {self.norm_cfg_threshold}")

    @property
    def reasoning(self) -> bool:
        return self.think or self.reflect > 0

    def guidance(self, reference_threshold: float) -> Guidance:
        """The loop's guidance; the norm threshold defaults to the flow's reference."""
        threshold = reference_threshold if self.norm_cfg_threshold is None else self.norm_cfg_threshold
        return Guidance(self.cfg_scale, threshold, self.cfg_steps)

    @property
    def new_step_cache(self) -> Callable[[], StepCache] | None:
        """The step cache's factory when ``step_cache`` asks for one."""
        return (lambda: StepCache(self.step_cache)) if self.step_cache else None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the official code runs it (CUDA); float32 on CPU, where bf16 is slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
