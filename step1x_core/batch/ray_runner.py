"""The batch on Ray: the planned items become a Ray Data dataset, mapped by a pool of actors that each
hold one ``EditWorker`` (models loaded once per actor); the driver takes the results as they arrive and
records them exactly as the local runner does (same PNGs, same results.jsonl, same resume). Actors run
torch with the driver's CPU thread count, which makes their images the same as a local run's on the CPU.

One actor per GPU of the cluster (``num_gpus=1``), or ``workers`` CPU actors. On a cluster of several
machines, each needs this package installed and the model files and input images at the same paths
(a shared file system); the driver writes every output itself, so OUT only has to exist where it runs.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from .plan import Plan
from .worker import EditWorker, ModelFiles, OnOutcome, Outcome

__all__ = ["LOCAL", "RAY_MISSING", "RayUnavailable", "run_on_ray"]

logger = logging.getLogger(__name__)

LOCAL = "local"  # --ray without an address: start a cluster on this machine
RAY_MISSING = '--ray needs Ray Data, which is not installed: pip install "step1x-edit[ray]" (or "ray[data]")'
# One edit per block streams each result to the driver as soon as it exists; past this many items a block
# holds several (an edit takes seconds, so a block's overhead never matters, but millions of them would).
MAX_BLOCKS = 4096


class RayUnavailable(RuntimeError):
    """Ray is not installed, or its cluster cannot run the batch; the message says what to do."""


class EditActor:
    """A Ray Data map actor: one EditWorker, built once, then one row (one planned item) per call.

    ``threads``: torch's CPU thread count, the driver's. Ray starts an actor of one CPU with one torch
    thread, and torch's CPU kernels split their sums by thread count, so the same edit on one and on two
    threads differs in the last bit of some values, and after rounding in about 0.07% of the pixels (by
    one level). With the local run's count the images are the same."""

    def __init__(self, files: ModelFiles, threads: int | None = None):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        self.worker = EditWorker(files)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        plan = Plan.from_json(row["plan"], row["image"] or None)
        return self.worker.run(plan).to_row()


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 - Ray without its data extra lacks it
    except ImportError:
        raise RayUnavailable(RAY_MISSING) from None
    return ray


def _connect(ray, address: str, workers: int | None) -> bool:
    """Join the cluster (True when this call started it, so the run also stops it)."""
    if ray.is_initialized():
        return False
    if address == LOCAL:
        # A private cluster for this run, reachable from this machine only.
        ray.init(address=LOCAL, num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1")
    else:
        try:
            ray.init(address=address)
        except ConnectionError as err:
            raise RayUnavailable(f"cannot reach the Ray cluster at {address}: {err}; start it with `ray start "
                                 "--head` there, or use --ray without an address for a local one") from None
    return True


def _pool(ray, files: ModelFiles, workers: int | None, items: int) -> tuple[ModelFiles, int, dict[str, float]]:
    """The actors' model settings, their number and the resources each one takes."""
    if workers is not None:
        return replace(files, load={**files.load, "device": "cpu"}), min(workers, items), {"num_cpus": 1}
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus == 0:
        raise RayUnavailable("the Ray cluster has no GPU; pass --workers N to edit on N CPU workers instead")
    return files, min(gpus, items), {"num_gpus": 1}


def run_on_ray(todo: list[Plan], files: ModelFiles, on_outcome: OnOutcome, *, address: str = LOCAL,
               workers: int | None = None) -> None:
    """Edit ``todo`` on Ray, calling ``on_outcome`` in this process for each item as it finishes."""
    ray = _ray()
    started = _connect(ray, address, workers)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the batch's own bar counts edits
        context.print_on_execution_start = False
        actor_files, size, resources = _pool(ray, files, workers, len(todo))
        logger.info("editing on Ray with %d actor(s), %s each", size,
                    ", ".join(f"{k}={v:g}" for k, v in resources.items()))
        plans = {plan.item.id: plan for plan in todo}
        rows = [{"plan": plan.to_json(), "image": plan.item.image if isinstance(plan.item.image, bytes) else b""}
                for plan in todo]
        dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
        import torch

        threads = torch.get_num_threads()  # the local run's: the same images (see EditActor)
        edited = dataset.map(EditActor, fn_constructor_kwargs={"files": actor_files, "threads": threads},
                             compute=ray.data.ActorPoolStrategy(size=size), **resources)
        for row in edited.iter_rows():
            outcome = Outcome.from_row(row)
            on_outcome(plans[outcome.id], outcome)
    finally:
        if started:
            ray.shutdown()
