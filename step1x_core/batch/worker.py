"""One batch worker: loads the models on first use and keeps them, then edits planned items one by one.

The local runner has one; on Ray each actor has one. Both run this same code, so an item gives the same
image either way. A bad item becomes an error outcome and the worker goes on; a model that cannot load
is fatal (every item would fail the same way), so the run stops and says why.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, UnidentifiedImageError

from ..memory import is_out_of_memory
from ..images.reading import load_rgb, to_rgb
from ..images.sizing import resize_to_level, size_for_level
from ..pipeline import Step1XEditPipeline, load_dit_for
from ..pipeline.reasoned import ReasonedEdit
from ..qwen.embedder_v12 import QwenV12Embedder
from ..qwen.prompt import DROP_TOKENS, MAX_LENGTH
from ..qwen.prompt_v12 import DROP_TOKENS_V12, MAX_LENGTH_V12
from .plan import Plan
from ..reasoning.report import format_run

__all__ = ["OUT_OF_MEMORY_ITEM", "EditWorker", "ModelFiles", "OnOutcome", "Outcome"]

logger = logging.getLogger(__name__)

OUT_OF_MEMORY_ITEM = "out of memory"  # how an item's error starts when an allocation failed


@dataclass(frozen=True)
class ModelFiles:
    """The VAE and Qwen every DiT shares, and how to load them (``cli.load_options``)."""

    vae: str
    qwen: str
    load: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What became of one item: the edited image, or the error message (``fatal``: stop the run)."""

    id: str
    image: Image.Image | None = None
    error: str | None = None
    seconds: float = 0.0
    fatal: bool = False
    reasoning: dict[str, Any] | None = None  # v1.2 think/reflect: the instruction used, rounds, scores, log

    def to_row(self) -> dict[str, Any]:
        """A Ray Data row: the image as PNG bytes (lossless, so the driver saves the same pixels)."""
        png = b""
        if self.image is not None:
            buffer = io.BytesIO()
            self.image.save(buffer, format="PNG")
            png = buffer.getvalue()
        return {"id": self.id, "png": png, "error": self.error or "", "seconds": self.seconds, "fatal": self.fatal,
                "reasoning": json.dumps(self.reasoning) if self.reasoning is not None else ""}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Outcome:
        image = Image.open(io.BytesIO(row["png"])) if row["png"] else None
        reasoning = json.loads(row["reasoning"]) if row.get("reasoning") else None
        return cls(row["id"], image, row["error"] or None, float(row["seconds"]), bool(row["fatal"]), reasoning)


# What a runner does with each finished item (record it, update the progress bar), locally or on Ray.
OnOutcome = Callable[[Plan, Outcome], None]


def reasoning_record(reasoned: ReasonedEdit) -> dict[str, Any]:
    """What thinking and reflection did, for the item's results line."""
    record: dict[str, Any] = {"instruction_used": reasoned.instruction}
    if reasoned.run is not None:
        record.update(rounds=len(reasoned.run.rounds), chosen_round=reasoned.run.chosen, scores=reasoned.run.scores,
                      log=format_run(reasoned.run))
    return record


class ModelLoadError(RuntimeError):
    """The models cannot be loaded; every item would fail the same way."""


def load_item_image(image: str | bytes) -> Image.Image:
    """The item's input as RGB; a missing or unreadable file is named in one line."""
    try:
        if isinstance(image, bytes):
            with Image.open(io.BytesIO(image)) as raw:
                raw.load()
                return to_rgb(raw)
        return load_rgb(Path(image).expanduser())
    except FileNotFoundError:
        raise ValueError(f"image not found: {image}") from None
    except UnidentifiedImageError:
        what = "the image held in the manifest" if isinstance(image, bytes) else str(image)
        raise ValueError(f"{what} is not an image Pillow can read (PNG, JPEG, WebP, ...)") from None


def check_instruction_fits(pipe: Step1XEditPipeline, instruction: str, working: Image.Image) -> None:
    """A batch cannot watch warnings: an instruction whose end would be cut off is the item's error."""
    if pipe.dit.params.version.reasoning_prompts:  # v1.2's format: 90 dropped, 2048 kept
        kept = len(QwenV12Embedder.from_embedder(pipe.embedder).token_ids(instruction, working)) - DROP_TOKENS_V12
        limit = MAX_LENGTH_V12
    else:
        kept, limit = len(pipe.embedder.token_ids(instruction, working)) - DROP_TOKENS, MAX_LENGTH
    if kept > limit:
        raise ValueError(f"instruction too long: with the image it takes {kept} tokens, Step1X-Edit reads "
                         f"{limit}; shorten it by about {kept - limit} tokens")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    known = isinstance(err, (ValueError, OSError))
    return text if known else f"{type(err).__name__}: {text}"


class EditWorker:
    """Edits planned items with models loaded once (one pipeline per DiT file; VAE and Qwen shared)."""

    def __init__(self, files: ModelFiles):
        self.files = files
        self._pipelines: dict[tuple[str, str | None], Step1XEditPipeline] = {}
        self._load_error: str | None = None
        self._loading = 0.0  # seconds spent loading during the current item, not counted as its edit time

    def pipeline(self, dit: str, version: str | None) -> Step1XEditPipeline:
        key = (dit, version)
        for (path, _), loaded in self._pipelines.items():
            if path == dit and version is not None and str(loaded.version) == version:
                return loaded  # asked by version, and that file already runs as that version
        if key not in self._pipelines:
            if self._load_error is not None:
                raise ModelLoadError(self._load_error)
            start = time.perf_counter()
            try:
                self._pipelines[key] = self._load(dit, version)
            except Exception as err:  # noqa: BLE001 - a load failure stops the run with its message
                self._load_error = ("cannot load the models: out of memory" if is_out_of_memory(err) else
                                    f"cannot load the models: {_one_line(err)}")
                raise ModelLoadError(self._load_error) from err
            self._loading += time.perf_counter() - start
            logger.info("loaded in %.1f s", time.perf_counter() - start)
        return self._pipelines[key]

    def _load(self, dit: str, version: str | None) -> Step1XEditPipeline:
        if not self._pipelines:
            logger.info("loading %s, %s, %s", Path(dit).name, Path(self.files.vae).name, Path(self.files.qwen).name)
            return Step1XEditPipeline.from_files(dit, self.files.vae, self.files.qwen, version=version,
                                                 **self.files.load)
        base = next(iter(self._pipelines.values()))
        logger.info("loading %s (the VAE and Qwen are shared)", Path(dit).name)
        options = {k: v for k, v in self.files.load.items() if k not in ("device", "dtype")}
        return base.with_dit(load_dit_for(dit, base.device, base.dtype, version=version, **options))

    def edit(self, plan: Plan) -> tuple[Image.Image, dict[str, Any] | None]:
        """The edited image, and with v1.2's think/reflect what they did; raises ValueError (or a torch error)
        for a bad item."""
        image = load_item_image(plan.item.image)
        settings = plan.settings
        size_for_level(image.width, image.height, settings.size_level)  # size level and aspect ratio first
        pipe = self.pipeline(plan.dit, plan.version)
        check_instruction_fits(pipe, plan.item.instruction, resize_to_level(image, settings.size_level,
                                                                             settings.resample))
        if not settings.reasoning:
            return pipe(image, plan.item.instruction, settings), None
        reasoned = pipe.reason(image, plan.item.instruction, settings)
        return reasoned.image, reasoning_record(reasoned)

    def run(self, plan: Plan) -> Outcome:
        """Edit one item; its failure is an outcome, not an exception (the next item still runs). Its
        seconds leave out the models' first load."""
        start, self._loading = time.perf_counter(), 0.0
        try:
            image, reasoning = self.edit(plan)
        except ModelLoadError as err:
            return Outcome(plan.item.id, error=str(err), fatal=True)
        except Exception as err:  # noqa: BLE001 - a bad item is recorded and the batch goes on
            if is_out_of_memory(err):
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                error = (f"{OUT_OF_MEMORY_ITEM} at size level {plan.settings.size_level}; try a lower size_level "
                         "for this item, --weight-dtype float8_e4m3fn or --offload")
                return Outcome(plan.item.id, error=error, seconds=self._seconds(start))
            logger.debug("item %s failed", plan.item.id, exc_info=True)
            return Outcome(plan.item.id, error=_one_line(err), seconds=self._seconds(start))
        return Outcome(plan.item.id, image=image, seconds=self._seconds(start), reasoning=reasoning)

    def _seconds(self, start: float) -> float:
        return time.perf_counter() - start - self._loading
