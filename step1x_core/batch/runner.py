"""A batch run from start to end: plan every item, skip what is already done, edit the rest (in this
process or on Ray), record each result as it arrives, and leave results.jsonl with one line per item
whatever happens (finished, interrupted, or stopped by a model that cannot load)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..images.writing import remove_leftover_temporaries
from .lock import OutputLock
from .manifest import EditItem, file_name_problem, short_id
from .plan import Plan, RunDefaults, plan_item
from .results import ResultsLog
from .worker import EditWorker, ModelFiles, OnOutcome, Outcome

__all__ = ["BatchAborted", "BatchSummary", "run_batch"]

logger = logging.getLogger(__name__)

class BatchAborted(RuntimeError):
    """The run cannot go on (a model that does not load); finished items stay recorded."""


@dataclass(frozen=True)
class BatchSummary:
    total: int  # items in the manifest
    skipped: int  # done by an earlier run with the same settings
    ran: int  # edited (or failed) in this run
    ok: int  # items whose latest record is ok
    errors: int  # items whose latest record is an error
    out_of_memory: int = 0  # of those errors, items that ran out of memory


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def output_problem(item: EditItem, log: ResultsLog, inputs: dict[Path, list[str]]) -> str | None:
    """Why writing this item's PNG would lose a file of the user's: it is an item's input image, or a file
    this batch did not write. ``inputs``: each input image path, with the ids of the items reading it."""
    output = log.output_path(item.id)
    for source, readers in inputs.items():
        if _same_file(output, source):
            whose = "its own input image" if readers == [item.id] else (
                "the input image of " + ", ".join(short_id(i) for i in readers[:3]) + (" ..." if len(readers) > 3 else ""))
            return (f"its output {output} is {whose}: writing the edit there would destroy the original; give "
                    "another --out folder or rename the id")
    if output.is_dir():
        return f"its output {output} is a folder; rename the id or move the folder"
    if output.exists() and not log.wrote(item.id):
        return (f"its output {output} already exists and this batch did not write it (it is not in "
                f"{log.journal.path.name}); move or delete that file, give another --out folder, or rename the id")
    return None


def plan_all(items: list[EditItem], defaults: RunDefaults, log: ResultsLog) -> tuple[list[Plan], int]:
    """The plans still to run, and how many items were skipped as done; a bad value, an id that cannot be a
    file name, or an output that would replace a file the batch did not write is recorded at once."""
    inputs: dict[Path, list[str]] = {}
    for item in items:
        if isinstance(item.image, str):
            inputs.setdefault(Path(item.image).expanduser(), []).append(item.id)
    todo, skipped = [], 0
    for item in items:
        try:
            problem = file_name_problem(item.id)
            if problem:
                raise ValueError(f"id {short_id(item.id)} cannot name its output file: {problem}")
            plan = plan_item(item, defaults)
        except ValueError as err:
            logger.warning("%s: %s", short_id(item.id), err)
            log.record_error(item, str(err))
            continue
        if log.is_done(plan):
            skipped += 1
            continue
        problem = output_problem(item, log, inputs)
        if problem:
            logger.warning("%s: %s", short_id(item.id), problem)
            log.record_error(item, f"item {short_id(item.id)}: {problem}")
            continue
        log.note_input(plan)
        todo.append(plan)
    return todo, skipped


def run_locally(todo: list[Plan], files: ModelFiles, on_outcome: OnOutcome) -> None:
    """One worker in this process: the models load once, at the first item that needs them."""
    worker = EditWorker(files)
    for plan in todo:
        on_outcome(plan, worker.run(plan))


def run_batch(items: list[EditItem], defaults: RunDefaults, files: ModelFiles, out_dir: str | Path, *,
              ray: str | None = None, workers: int | None = None, progress: bool = True) -> BatchSummary:
    """Edit every item not already done into ``out_dir``. ``ray``: None runs here; "local" starts a local
    Ray cluster; anything else is the address of a running one (then ``workers`` CPU actors, or one
    actor per GPU when None). Raises BatchAborted, or KeyboardInterrupt on Ctrl-C; either way what was
    finished is recorded and a re-run resumes. Raises FolderInUse when another run holds ``out_dir``."""
    from tqdm import tqdm

    with OutputLock(out_dir):  # one run per folder (a command holds it already: then this is a no-op)
        return _run_batch(items, defaults, files, out_dir, ray, workers, progress, tqdm)


def _run_batch(items: list[EditItem], defaults: RunDefaults, files: ModelFiles, out_dir: str | Path,
               ray: str | None, workers: int | None, progress: bool, tqdm) -> BatchSummary:
    remove_leftover_temporaries(out_dir)  # of saves a kill -9 cut short (the lock says no run is writing here)
    log = ResultsLog(out_dir)
    ids = [item.id for item in items]
    try:
        todo, skipped = plan_all(items, defaults, log)
        if skipped:
            logger.info("%d of %d items already done with the same settings; skipping them", skipped, len(items))
        with tqdm(total=len(todo), desc="editing", unit="edit", disable=not progress or not todo) as bar:
            failed = 0

            def on_outcome(plan: Plan, outcome: Outcome) -> None:
                nonlocal failed
                if outcome.fatal:
                    raise BatchAborted(outcome.error)
                log.record_outcome(plan, outcome)
                if outcome.error is not None:
                    failed += 1
                    logger.warning("%s: %s", plan.item.id, outcome.error)
                bar.update(1)
                bar.set_postfix(errors=failed, refresh=False)

            if not todo:
                pass
            elif ray is None:
                run_locally(todo, files, on_outcome)
            else:
                from .ray_runner import run_on_ray

                run_on_ray(todo, files, on_outcome, address=ray, workers=workers)
    finally:
        log.close(ids)
    ok, errors = log.summary(ids)
    return BatchSummary(total=len(items), skipped=skipped, ran=len(todo), ok=ok, errors=errors,
                        out_of_memory=log.out_of_memory(ids))
