"""What a model needs from its weights, as data, and one check of a file's tensors against it.

Every loader describes its model's tensors in an ``ExpectedTensors`` (names and shapes, usually read off the
model built on the meta device; the storage dtypes it can use; the numbered blocks and sizes its config states)
and calls ``check_tensors`` with what the file's header says, before anything is built. The DiT, the VAE and
Qwen2.5-VL (folder or single file) all go through here, so one file gets one verdict in the command line, the
Python API and ComfyUI, and every problem is one clause: the tensor, what was found, what was expected.
Loaders then cast or assign each tensor through ``checked_weight``, which refuses NaN and Inf on the way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..finite import all_finite, describe_non_finite
from ..ops import to_dtype
from .dtypes import FLOAT_STORAGE, accepted, describe_dtype, dtype_name
from .safetensors_file import ModelFileError

__all__ = ["BlockCount", "ExpectedTensors", "FLOAT_STORAGE", "NamedSize", "check_tensors", "checked_weight",
           "describe_problems", "dtype_name", "find_problems", "module_shapes"]

SHOWN = 3  # examples per problem


@dataclass(frozen=True)
class NamedSize:
    """A size the config states and the tensor axis that shows it in the weights."""

    name: str  # e.g. "hidden_size"
    value: int
    tensor: str  # e.g. "model.embed_tokens.weight"
    axis: int
    source: str  # why: "config.json", "the FLUX VAE's latent: 16 channels in 2x2 patches"


@dataclass(frozen=True)
class BlockCount:
    """Numbered blocks ``{prefix}.0.`` ... ``{prefix}.{count-1}.`` the model has (layers, transformer blocks)."""

    prefix: str
    count: int
    name: str = "blocks"
    source: str = ""  # e.g. "num_hidden_layers in config.json"; empty when counted from the file itself


@dataclass(frozen=True)
class ExpectedTensors:
    """The tensors a model needs: every name with its shape, and what may store them."""

    model: str  # completes "expected ...", e.g. "the Step1X-Edit DiT"
    shapes: Mapping[str, tuple[int, ...]]
    fix: str  # what to do about a file that does not match
    dtypes: Collection[str] = FLOAT_STORAGE
    ignored: Callable[[str], bool] = lambda name: False  # tensors the loader drops on purpose (lm_head.*)
    sizes: tuple[NamedSize, ...] = ()
    blocks: tuple[BlockCount, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)  # name -> what its absence means


def module_shapes(module: nn.Module, rename: Callable[[str], str] = lambda name: name) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter and buffer in ``module``'s state dict (build it on meta: no memory)."""
    return {rename(name): tuple(t.shape) for name, t in module.state_dict().items()}


def _ranges(indices: Collection[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _examples(names: list[str], total: int | None = None) -> str:
    total = len(names) if total is None else total
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {total - SHOWN} more" if total > SHOWN else "")


def _block_index(name: str, prefix: str) -> int | None:
    m = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _block_problems(expected: ExpectedTensors, names: Collection[str]) -> tuple[list[str], set[str]]:
    """Layer-count problems, and the tensor names they explain (left out of the missing/unexpected lists)."""
    problems, explained = [], set()
    for blocks in expected.blocks:
        found = {i for n in names if (i := _block_index(n, blocks.prefix)) is not None}
        extra = sorted(i for i in found if i >= blocks.count)
        absent = sorted(set(range(blocks.count)) - found)
        says = f", but {blocks.source} says {blocks.count}" if blocks.source else ""
        held = f"{blocks.prefix}.{_ranges(found)}"
        if extra:
            problems.append(f"the weights hold {len(found)} {blocks.name} ({held}){says}: {blocks.prefix}."
                            f"{_ranges(extra)} would be silently left out")
        if absent:
            holds = f"the weights hold {held}" if found else f"the weights hold no {blocks.prefix}.*"
            problems.append(f"{blocks.name} {blocks.prefix}.{_ranges(absent)} missing ({holds}"
                            + (f"; {blocks.source} says {blocks.count}" if blocks.source else "") + ")")
        bad = set(extra) | set(absent)
        explained |= {n for n in [*names, *expected.shapes] if _block_index(n, blocks.prefix) in bad}
    return problems, explained


def _size_problems(expected: ExpectedTensors, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    problems = []
    for size in expected.sizes:
        shape = shapes.get(size.tensor)
        if shape is not None and len(shape) > size.axis and shape[size.axis] != size.value:
            problems.append(f"{size.name} must be {size.value} ({size.source}), but the weights have "
                            f"{shape[size.axis]} ({size.tensor} is {list(shape)})")
    return problems


def _dtype_problems(expected: ExpectedTensors, dtypes: Mapping[str, str]) -> list[str]:
    by_dtype: dict[str, list[str]] = {}
    for name, dtype in dtypes.items():
        if dtype not in expected.dtypes and not expected.ignored(name):
            by_dtype.setdefault(dtype, []).append(name)
    return [f"stores {len(names)} tensor(s) as {dtype} ({describe_dtype(dtype)}), e.g. {_examples(sorted(names))}; "
            f"weights must be {accepted(expected.dtypes)}" for dtype, names in sorted(by_dtype.items())]


def find_problems(expected: ExpectedTensors, shapes: Mapping[str, tuple[int, ...]],
                  dtypes: Mapping[str, str | torch.dtype]) -> list[str]:
    """Every way ``shapes``/``dtypes`` (a file's header) differ from ``expected``, one clause per problem."""
    dtypes = {name: dtype_name(d) for name, d in dtypes.items()}
    names = [n for n in shapes if not expected.ignored(n)]
    problems = _dtype_problems(expected, dtypes)
    block_problems, explained = _block_problems(expected, names)
    size_problems = _size_problems(expected, shapes)
    problems += size_problems + block_problems
    missing = sorted(n for n in expected.shapes if n not in shapes and n not in explained)
    unexpected = sorted(n for n in names if n not in expected.shapes and n not in explained)
    wrong = [n for n in sorted(set(names) & set(expected.shapes)) if tuple(shapes[n]) != tuple(expected.shapes[n])]
    for name in missing:
        if name in expected.notes:
            problems.append(f"lacks {name}: {expected.notes[name]}")
    missing = [n for n in missing if n not in expected.notes]
    if missing:
        problems.append(f"lacks {len(missing)} tensor(s), e.g. {_examples(missing)} (an incomplete file?)")
    if unexpected:
        problems.append(f"has {len(unexpected)} tensor(s) that {expected.model} does not have, e.g. "
                        f"{_examples(unexpected)} (another model, or a variant this pack does not know)")
    if wrong and not size_problems:  # a wrong config size already explains every shape that follows from it
        shown = [f"{n} is {list(shapes[n])}, expected {list(expected.shapes[n])}" for n in wrong[:SHOWN]]
        more = f" and {len(wrong) - SHOWN} more" if len(wrong) > SHOWN else ""
        problems.append(f"has {len(wrong)} tensor(s) of the wrong shape: {'; '.join(shown)}{more}")
    return problems


def describe_problems(expected: ExpectedTensors, problems: list[str]) -> str:
    """'problem; problem. Expected ... Fix: ...' (the file's name goes in front)."""
    return f"{'; '.join(problems)}. Expected {expected.model}. {expected.fix}"


def check_tensors(file_name: str, expected: ExpectedTensors, shapes: Mapping[str, tuple[int, ...]],
                  dtypes: Mapping[str, str | torch.dtype], error: type[ModelFileError] = ModelFileError) -> None:
    """Raise ``error`` ('{file}: problem; problem. Expected ... Fix: ...') unless the tensors fit ``expected``."""
    problems = find_problems(expected, shapes, dtypes)
    if problems:
        raise error(f"{file_name}: {describe_problems(expected, problems)}")


def _probe(source: Tensor, out: Tensor) -> Tensor:
    """The cheaper of the two to check when both answer the same: on the CPU, the narrower source if the cast
    cannot overflow (bf16 -> float32); on an accelerator the result, which is already there."""
    if out is source or out.device.type != "cpu" or source.device.type != "cpu":
        return out
    if not (source.is_floating_point() and out.is_floating_point()) or source.element_size() > out.element_size():
        return out
    widening = torch.finfo(out.dtype).max >= torch.finfo(source.dtype).max
    return source if widening else out


def checked_weight(tensor: Tensor, name: str, file_name: str, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None,
                   error: type[ModelFileError] = ModelFileError) -> Tensor:
    """``tensor`` moved/cast as asked, refused if the result holds NaN or Inf (a corrupt file, or values that
    overflow the target dtype). The check reads the tensor while the cast has it in cache anyway."""
    out = tensor if device is None else tensor.to(device)
    out = out if dtype is None else to_dtype(out, dtype)
    if not all_finite(_probe(tensor, out)):
        where = f"{file_name}: tensor {name}" if file_name else f"tensor {name}"
        if all_finite(tensor):
            target = str(dtype).replace("torch.", "")
            raise error(f"{where} overflows {target} ({describe_non_finite(out)} after the cast); load it in a "
                        "wider dtype (bfloat16 or float32)")
        raise error(f"{where} holds {describe_non_finite(tensor)}; the file is corrupt (a damaged download, or a "
                    "broken conversion or merge): download or export it again")
    return out
