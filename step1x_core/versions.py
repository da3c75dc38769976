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

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: str | Version) -> Version:
        """``value`` as a Version; a clear error naming the choices for anything else."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown Step1X-Edit version {value!r}: choose {' or '.join(VERSIONS)}") from None

    @property
    def has_connector_scale_factor(self) -> bool:
        """v1.0's connector multiplies the pooled mean by (1 + scale_factor); v1.1 has no such parameter."""
        return self is Version.V1_0

    @property
    def reference_offset(self) -> tuple[int, int, int]:
        """Added to the reference tokens' (axis, row, col) ids: v1.0 gives them the target's ids, v1.1
        shifts them to (1, row+1, col+1)."""
        return (0, 0, 0) if self is Version.V1_0 else (1, 1, 1)


VERSIONS: tuple[str, ...] = tuple(v.value for v in Version)
