"""Datamodel estimation (DESIGN.md §1 step 1, §4): train the m subset models A(S_1)..A(S_m).

Block b of B models derives its α-subsets S_j and seeds from (root seed, b), is trained with the
model-batched engine, and writes the block's own chunk-aligned rows of the attribution store and
then its marker; a block is written by one worker at a time. The driver only schedules missing
blocks, so a rerun resumes. Blocks run as Ray tasks on CPUs, or on one GPU worker per GPU slot
with `--gpus-per-task` (cluster/estimate_workers.py). A retried block is trained with the same
seeds, subsets and thread count (--cpus-per-task), so on the same kind of CPU it writes the same
bytes; with another thread count or CPU its logits agree to float rounding (tests/test_estimate.py
checks both with 1 and 2 threads).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import ray
from tqdm import tqdm

from attribution.datasets import Dataset, load_dataset
from attribution.device import forced_cpu
from attribution.errors import DmmError
from attribution.models import default_model
from attribution.recipes import Recipe, resolve_recipe
from attribution.store import AttributionStore, StoreError, StoreSpec
from attribution.store_spec import spec_diff
from attribution.subsets import block_subsets

from .estimate_workers import GpuWorker, WorkerInfo, train_block, train_block_task
from .ray_runtime import connect, first_line

__all__ = ["EstimateError", "EstimateRequest", "EstimateResult", "run_estimate", "train_block"]


class EstimateError(DmmError):
    """A block that failed for good (transient failures were retried); completed blocks are kept."""


@dataclass(frozen=True)
class EstimateRequest:
    """What fixes the subset models: the store's identity (dataset, model, recipe, α, seed, B)."""
    dataset: str
    model: str
    recipe: Recipe
    alpha: float = 0.5
    seed: int = 0
    block_size: int = 64

    @classmethod
    def build(cls, dataset: str, model: str | None = None, recipe: str | Recipe | None = None,
              epochs: int | None = None, **kw) -> "EstimateRequest":
        """`model` defaults to the dataset's, `recipe` (a Recipe, name or file) to the (dataset, model) pair's;
        `epochs` overrides the recipe's, schedule shape kept (attribution/recipes.py `resolve_recipe`)."""
        model = model or default_model(dataset)
        return cls(dataset, model, resolve_recipe(dataset, model, recipe, epochs), **kw)

    def spec(self, data: Dataset) -> StoreSpec:
        return StoreSpec(dataset=data.name, fingerprint=data.fingerprint, model=self.model,
                         recipe=self.recipe.to_dict(), alpha=self.alpha, seed=self.seed,
                         block_size=self.block_size, n_train=data.n_train, n_points=data.n_points,
                         num_classes=data.num_classes)

    def block_subsets(self, block: int, n_train: int):
        """(masks (B, n), seeds (B,)) of block b: the same on every worker and every retry."""
        return block_subsets(self.seed, block, self.block_size, n_train, self.alpha)


@dataclass(frozen=True)
class EstimateResult:
    trained: int  # blocks trained by this run
    skipped: int  # blocks already complete when it started
    store: AttributionStore


def worker_slots(nodes: list[dict], cpus: float, gpus: float) -> int:
    """How many tasks of `cpus` CPUs and `gpus` GPUs the nodes (Ray resource dicts) run at once."""
    def fits(have: float, need: float) -> float:
        return math.floor(have / need + 1e-9) if need > 0 else math.inf
    return sum(min(fits(r.get("CPU", 0), cpus), fits(r.get("GPU", 0), gpus)) for r in nodes)


def _join(address: str | None, cpus: float, gpus: float) -> list[dict]:
    """Attach to Ray and refuse a task size that no live node has: Ray would queue such tasks forever.

    Returns the live nodes' resources."""
    connect(address)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not worker_slots(nodes, cpus, gpus):
        most = {k: max((r.get(k, 0) for r in nodes), default=0) for k in ("CPU", "GPU")}
        raise EstimateError(f"no node of the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs for one task "
                            f"(its nodes have at most {most['CPU']:g} CPUs and {most['GPU']:g} GPUs); fix: lower "
                            "--cpus-per-task/--gpus-per-task or add such nodes to the cluster")
    return nodes


def _check_resources(cpus: float, gpus: float) -> None:
    """Refuse task sizes Ray would refuse only once the store exists (≤ 0, finer than Ray's 0.0001)."""
    if cpus <= 0 or gpus < 0:
        raise DmmError("need --cpus-per-task > 0 and --gpus-per-task >= 0; fix the resources")
    try:
        (GpuWorker if gpus > 0 else train_block_task).options(num_cpus=cpus, num_gpus=gpus)
    except ValueError as e:
        raise DmmError(f"--cpus-per-task {cpus:g} / --gpus-per-task {gpus:g}: {first_line(e)}; "
                       "fix the resources") from None


def _may_train(store_url: str, spec: StoreSpec, num_models: int) -> bool:
    """Whether the request has models to train: no store yet, or this request's store short of them.

    False for a store built for another request, which `open_or_create` refuses before Ray starts.
    """
    try:
        store = AttributionStore.open(store_url)
    except StoreError:
        return True  # none yet (anything else unreadable is named by open_or_create)
    return not spec_diff(store.attrs, spec.to_attrs()) and (num_models > store.num_models
                                                             or bool(store.missing_blocks()))


def _failure(what: str, err: ray.exceptions.RayError) -> DmmError:
    cause = getattr(err, "cause", None)
    if isinstance(cause, DmmError):
        return cause
    return EstimateError(f"{what} failed ({first_line(cause or err)}); completed blocks are kept: "
                         "rerun the same command to resume")


def _run_blocks(missing: list[int], slots, submit, on_ready, starts: dict | None = None) -> None:
    """Train the `missing` blocks on `slots`, one block in flight per slot, its next one when it is done.

    `submit(slot, block)` returns the block's ref; `starts` ({ref: slot}, a worker's start) are
    awaited alongside. `on_ready(slot, block, value)` sees every ready value (block None for a
    start). The first failure for good cancels the rest and is raised.
    """
    todo, pending = list(reversed(missing)), {ref: (slot, None) for ref, slot in (starts or {}).items()}

    def feed(slot) -> None:
        if todo:
            block = todo.pop()
            pending[submit(slot, block)] = (slot, block)

    for slot in slots:
        feed(slot)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        slot, block = pending.pop(ref)
        try:
            value = ray.get(ref)
        except ray.exceptions.RayError as e:
            for other in pending:
                ray.cancel(other)
            raise _failure(f"GPU worker {slot + 1}" if block is None else f"block {block}", e) from None
        on_ready(slot, block, value)
        if block is not None:
            feed(slot)


def _log(line: str) -> None:
    tqdm.write(f"estimate: {line}", file=sys.stderr)


def _run_on_gpu_workers(store: AttributionStore, request: EstimateRequest, missing: list[int], workers: list,
                        done) -> None:
    """The blocks on GpuWorker actors, which are killed after; logs where each computes and what it did."""
    n = len(workers)
    latest: dict[int, WorkerInfo] = {}
    blocks = [0] * n

    def ready(slot: int, block: int | None, info: WorkerInfo) -> None:
        latest[slot] = info
        if block is None:
            _log(f"GPU worker {slot + 1}/{n} on {info.where()}")
        else:
            blocks[slot] += 1
            done()

    try:
        _run_blocks(missing, range(n), lambda slot, b: workers[slot].train.remote(store, request, b), ready,
                    starts={w.start.remote(): i for i, w in enumerate(workers)})
    finally:
        for w in workers:
            ray.kill(w)
    for slot, info in sorted(latest.items()):
        _log(f"GPU worker {slot + 1}/{n} trained {blocks[slot]} blocks on {info.device}, Ray GPU ids "
             f"{list(info.gpu_ids)}; dataset loaded onto it {info.loads} time(s)")


def run_estimate(request: EstimateRequest, store_url: str, num_models: int, address: str | None = None,
                 cpus_per_task: float = 1, gpus_per_task: float = 0, progress: bool = True) -> EstimateResult:
    """Open (or create, or grow) the store, then train its missing blocks: as Ray tasks, or with
    `gpus_per_task` > 0 on GPU workers that keep the dataset on their GPU (DMM_FORCE_DEVICE=cpu: on the CPU).

    The store is checked against the request before anything is written or Ray is started; when
    there are models to train, Ray's nodes are checked for the task size before the store changes.
    """
    _check_resources(cpus_per_task, gpus_per_task)
    force_cpu = gpus_per_task > 0 and forced_cpu()
    data = load_dataset(request.dataset, download=True)  # a request names the dataset its user asked for
    spec = request.spec(data)
    if _may_train(store_url, spec, num_models):
        _join(address, cpus_per_task, gpus_per_task)
    store = AttributionStore.open_or_create(store_url, spec, num_models)
    missing = store.missing_blocks()
    skipped = store.num_blocks - len(missing)
    if missing:
        nodes = _join(address, cpus_per_task, gpus_per_task)  # again (cheap): the store may have changed
        slots, threads = worker_slots(nodes, cpus_per_task, gpus_per_task), max(1, int(cpus_per_task))
        with tqdm(total=store.allocated_models, initial=skipped * request.block_size, unit="model",
                  desc="estimate", disable=not progress, smoothing=0.1) as bar:
            def done(*_) -> None:
                bar.update(request.block_size)

            if gpus_per_task > 0:  # one worker per GPU slot, at most one per block
                worker = GpuWorker.options(num_cpus=cpus_per_task, num_gpus=gpus_per_task)
                workers = [worker.remote(request.dataset, threads, force_cpu) for _ in range(min(slots, len(missing)))]
                _run_on_gpu_workers(store, request, missing, workers, done)
            else:  # two tasks per slot: workers stay busy, memory stays bounded
                task = train_block_task.options(num_cpus=cpus_per_task)
                _run_blocks(missing, range(2 * slots), lambda _, b: task.remote(store, request, b, "cpu", threads),
                            done)
    return EstimateResult(trained=len(missing), skipped=skipped, store=store)
