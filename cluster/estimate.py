"""Datamodel estimation (DESIGN.md §1 step 1, §4): train the m subset models A(S_1)..A(S_m).

One Ray task per block b of B models: it derives its α-subsets S_j and seeds from (root seed, b),
trains the block with the model-batched engine, writes the block's own chunk-aligned rows of the
attribution store and then its marker. The driver only schedules missing blocks, so a rerun
resumes. A retried block is trained with the same seeds, subsets and thread count (--cpus-per-task),
so on the same kind of CPU it writes the same bytes; with another thread count or CPU its logits
agree to float rounding (tests/test_estimate.py checks both with 1 and 2 threads).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import ray
import torch
from tqdm import tqdm

from attribution.datasets import Dataset, check_fingerprint, load_dataset
from attribution.engine import train_batched
from attribution.errors import DmmError
from attribution.models import default_model
from attribution.recipes import Recipe, resolve_recipe
from attribution.store import AttributionStore, StoreError, StoreSpec
from attribution.store_spec import spec_diff
from attribution.subsets import block_subsets

from .ray_runtime import connect, first_line

MAX_RETRIES = 3  # per block, on worker death and on transient (I/O) errors
TRANSIENT_ERRORS = [OSError, TimeoutError]


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


def train_block(store: AttributionStore, request: EstimateRequest, block: int,
                device: str = "cpu", threads: int | None = None) -> int:
    """Train block b's B models and write their masks and logits (then the marker) into the store."""
    if threads is not None:
        torch.set_num_threads(threads)
    data = load_dataset(request.dataset, download=True)  # a request names the dataset its user asked for
    check_fingerprint(data, store.fingerprint, f"store {store.url}")
    masks, seeds = request.block_subsets(block, data.n_train)
    result = train_batched(request.model, data, request.recipe, seeds, masks, device)
    store.write_block(block, masks, result.logits.cpu().numpy())
    return block


_train_block_task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=TRANSIENT_ERRORS)(train_block)


def _max_in_flight(cpus: float, gpus: float) -> int:
    """Two tasks per parallel slot of the cluster: workers stay busy, memory stays bounded."""
    res = ray.cluster_resources()
    slots = res.get("CPU", 1) / cpus
    if gpus > 0:
        slots = min(slots, res.get("GPU", 0) / gpus)
    return max(1, 2 * math.floor(slots))


def _join(address: str | None, cpus: float, gpus: float) -> None:
    """Attach to Ray and refuse a task size that no live node has: Ray would queue such tasks forever."""
    connect(address)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        most = {k: max((r.get(k, 0) for r in nodes), default=0) for k in ("CPU", "GPU")}
        raise EstimateError(f"no node of the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs for one task "
                            f"(its nodes have at most {most['CPU']:g} CPUs and {most['GPU']:g} GPUs); fix: lower "
                            "--cpus-per-task/--gpus-per-task or add such nodes to the cluster")


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


def _failure(block: int, err: ray.exceptions.RayError) -> DmmError:
    cause = getattr(err, "cause", None)
    if isinstance(cause, DmmError):
        return cause
    return EstimateError(f"block {block} failed ({first_line(cause or err)}); completed blocks are kept: "
                         "rerun the same command to resume")


def run_estimate(request: EstimateRequest, store_url: str, num_models: int, address: str | None = None,
                 cpus_per_task: float = 1, gpus_per_task: float = 0, progress: bool = True) -> EstimateResult:
    """Open (or create, or grow) the store, then train its missing blocks as Ray tasks.

    The store is checked against the request before anything is written or Ray is started; when
    there are models to train, Ray's nodes are checked for the task size before the store changes.
    """
    if cpus_per_task <= 0 or gpus_per_task < 0:
        raise DmmError("need --cpus-per-task > 0 and --gpus-per-task >= 0; fix the resources")
    data = load_dataset(request.dataset, download=True)  # a request names the dataset its user asked for
    spec = request.spec(data)
    if _may_train(store_url, spec, num_models):
        _join(address, cpus_per_task, gpus_per_task)
    store = AttributionStore.open_or_create(store_url, spec, num_models)
    missing = store.missing_blocks()
    skipped = store.num_blocks - len(missing)
    if missing:
        _join(address, cpus_per_task, gpus_per_task)  # again (cheap): the store may have changed since the check
        task = _train_block_task.options(num_cpus=cpus_per_task, num_gpus=gpus_per_task)
        device, threads = ("cuda" if gpus_per_task > 0 else "cpu"), max(1, int(cpus_per_task))
        limit = _max_in_flight(cpus_per_task, gpus_per_task)
        todo, pending = list(reversed(missing)), {}
        with tqdm(total=store.allocated_models, initial=skipped * request.block_size, unit="model",
                  desc="estimate", disable=not progress, smoothing=0.1) as bar:
            while todo or pending:
                while todo and len(pending) < limit:
                    b = todo.pop()
                    pending[task.remote(store, request, b, device, threads)] = b
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    block = pending.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as e:
                        for other in pending:
                            ray.cancel(other)
                        raise _failure(block, e) from None
                    bar.update(request.block_size)
    return EstimateResult(trained=len(missing), skipped=skipped, store=store)
