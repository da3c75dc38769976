"""Out of memory, told apart from every other failure: every command exits 3 with one documented line."""

from __future__ import annotations

import errno
import re

import torch

__all__ = ["EXIT_OUT_OF_MEMORY", "OUT_OF_MEMORY", "is_out_of_memory"]

# Every command's line for an allocation that failed (exit 3), as the README documents it.
OUT_OF_MEMORY = "out of memory; try --size-level 512, --weight-dtype float8_e4m3fn or --offload"
EXIT_OUT_OF_MEMORY = 3
# What PyTorch's allocators say when they fail: CUDA/MPS "... out of memory", the CPU allocator
# "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes".
_ALLOCATION_FAILED = re.compile(r"out of memory|can'?t allocate memory|cannot allocate memory|could not allocate|"
                                r"failed to allocate", re.IGNORECASE)


def is_out_of_memory(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error it was raised from) is an allocation that failed."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
            return True
        if isinstance(err, RuntimeError) and _ALLOCATION_FAILED.search(str(err)):
            return True
        if isinstance(err, OSError) and err.errno == errno.ENOMEM:  # e.g. mapping a model file
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False
