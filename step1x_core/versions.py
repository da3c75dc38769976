"""The released Step1X-Edit versions, and every behaviour that differs between them.

A ``Version`` is a ``str`` (``Version.V1_1 == "v1.1"``), so it reads and prints as users write it
(CLI flags, node combos, file metadata) while code asks it questions instead of comparing strings.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["VERSIONS", "Version"]


class Version(str, Enum):
    V1_0 = "v1.0"
    V1_1 = "v1.1"
    V1_2 = "v1.2"  # ReasonEdit: a fine-tuned Qwen2.5-VL, a new prompt format, thinking and reflection

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: str | Version) -> Version:
        """``value`` as a Version; a clear error naming the choices for anything else."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown Step1X-Edit version {value!r}: choose {', '.join(VERSIONS[:-1])} or "
                             f"{VERSIONS[-1]}") from None

    @property
    def has_connector_scale_factor(self) -> bool:
        """v1.0's connector multiplies the pooled mean by (1 + scale_factor); v1.1 has no such parameter."""
        return self is Version.V1_0

    @property
    def reference_offset(self) -> tuple[int, int, int]:
        """Added to the reference tokens' (axis, row, col) ids: v1.0 gives them the target's ids, v1.1
        shifts them to (1, row+1, col+1), v1.2 to (1, row, col)."""
        return {Version.V1_0: (0, 0, 0), Version.V1_1: (1, 1, 1), Version.V1_2: (1, 0, 0)}[self]

    @property
    def has_text_token_mapping(self) -> bool:
        """v1.2 adds the raw Qwen embeddings of quoted characters to the connector's output through a Linear."""
        return self is Version.V1_2

    @property
    def reasoning_prompts(self) -> bool:
        """v1.2's prompt format (instruction before the image, 90 tokens dropped, no padding, text positions),
        which its fine-tuned Qwen2.5-VL also uses to think and reflect."""
        return self is Version.V1_2


VERSIONS: tuple[str, ...] = tuple(v.value for v in Version)
