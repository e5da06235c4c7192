"""What Ray's workers run for `dmm estimate` (DESIGN.md §4): block b of B subset models at a time.

CPU path: `train_block` as a Ray task (a worker process loads a registered dataset once, then reuses
it). GPU path (`--gpus-per-task G`): one `GpuWorker` actor per GPU slot loads the dataset and places
it on its device once, then trains block after block on it; Ray shows the actor only its own GPUs, so
it computes on cuda:0, and a fractional G lets several actors share one GPU. With DMM_FORCE_DEVICE=cpu
the actor computes on the CPU although Ray assigned it a GPU, and writes the CPU task's bytes.
A retried block (task retry, actor restart) is trained with the same seeds, subsets and thread count.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray
import torch

from attribution.datasets import Dataset, check_fingerprint, load_dataset
from attribution.device import FORCE_DEVICE, gpu_worker_device
from attribution.engine import train_batched
from attribution.store import AttributionStore

if TYPE_CHECKING:
    from .estimate import EstimateRequest

MAX_RETRIES = 3  # per block, on worker death and on transient (I/O) errors
TRANSIENT_ERRORS = [OSError, TimeoutError]


def train_block(store: AttributionStore, request: EstimateRequest, block: int, device: str | torch.device = "cpu",
                threads: int | None = None, data: Dataset | None = None) -> int:
    """Train block b's B models and write their masks and logits (then the marker) into the store.

    `data` is the request's dataset already on `device` (a GPU worker's); without it, it is loaded here.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    if data is None:
        data = load_dataset(request.dataset, download=True)  # a request names the dataset its user asked for
    check_fingerprint(data, store.fingerprint, f"store {store.url}")
    masks, seeds = request.block_subsets(block, data.n_train)
    result = train_batched(request.model, data, request.recipe, seeds, masks, device)
    store.write_block(block, masks, result.logits.cpu().numpy())
    return block


train_block_task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=TRANSIENT_ERRORS)(train_block)


@dataclass(frozen=True)
class WorkerInfo:
    """Where a GPU worker computes, and how many times it has loaded the dataset onto its device."""
    node: str
    pid: int
    gpu_ids: tuple
    device: str
    forced: bool
    loads: int

    def where(self) -> str:
        forced = f" ({FORCE_DEVICE}=cpu)" if self.forced else ""
        return f"node {self.node}, pid {self.pid}: Ray GPU ids {list(self.gpu_ids)}, computing on {self.device}{forced}"


def on_device(data: Dataset, device: torch.device) -> Dataset:
    """The dataset with its four tensors on `device` (the same tensors where they are there already)."""
    return dataclasses.replace(data, **{k: getattr(data, k).to(device)
                                        for k in ("x_train", "y_train", "x_test", "y_test")})


@ray.remote(max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)
class GpuWorker:
    """One GPU slot: holds the dataset on its device across the blocks it trains."""

    def __init__(self, dataset: str, threads: int, force_cpu: bool):
        self.dataset, self.threads, self.force_cpu = dataset, threads, force_cpu
        self.data, self.loads = None, 0

    def start(self) -> WorkerInfo:
        """Load the dataset onto this worker's device, the first time only; say where it computes."""
        if self.data is None:
            self.device = gpu_worker_device(ray.get_gpu_ids(), self.force_cpu)
            self.data = on_device(load_dataset(self.dataset, download=True), self.device)
            self.loads += 1
        return WorkerInfo(ray.util.get_node_ip_address(), os.getpid(), tuple(ray.get_gpu_ids()), str(self.device),
                          self.force_cpu, self.loads)

    @ray.method(retry_exceptions=TRANSIENT_ERRORS)
    def train(self, store: AttributionStore, request: EstimateRequest, block: int) -> WorkerInfo:
        """Train and write block b on the resident dataset (loaded first if a restart dropped it)."""
        info = self.start()
        train_block(store, request, block, self.device, self.threads, self.data)
        return info
