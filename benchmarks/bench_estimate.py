"""Benchmark: subset models per second of `dmm estimate` through a local Ray vs the batched engine
called directly in one process, on the same m models (same blocks, masks, seeds, recipe).

Direct: `train_batched` block after block in this process, no store, timed with 1 thread and
with one thread per core; the faster is the baseline (small models often run best on 1 thread).
Ray: `run_estimate` timed end to end (scheduling, training, store writes and markers) after Ray
and its workers are up: start-up is paid once per job and excluded, so the job's steady-state
throughput is what compares. Overhead = direct / ray models/s.
Last line: {"bench": "estimate", "ray_models_per_s", "direct_models_per_s", "overhead", …}.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import ray
import torch

from attribution.datasets import load_dataset
from attribution.engine import train_batched
from cluster.estimate import EstimateRequest, run_estimate
from cluster.ray_runtime import connect


def direct_seconds(request: EstimateRequest, num_blocks: int, threads: int) -> float:
    torch.set_num_threads(threads)
    data = load_dataset(request.dataset)
    start = time.perf_counter()
    for b in range(num_blocks):
        masks, seeds = request.block_subsets(b, data.n_train)
        train_batched(request.model, data, request.recipe, seeds, masks)
    return time.perf_counter() - start


@ray.remote(num_cpus=1)
def _warm_worker(dataset: str) -> int:
    """Start a worker with the imports and data a block task needs."""
    import attribution.engine  # noqa: F401

    load_dataset(dataset)
    return os.getpid()


def ray_seconds(request: EstimateRequest, num_models: int) -> float:
    connect()
    ray.get([_warm_worker.remote(request.dataset) for _ in range(int(ray.cluster_resources()["CPU"]))])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_estimate(request, os.path.join(tmp, "store"), num_models, progress=False)
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--num-models", type=int, default=512)
    args = p.parse_args()
    request = EstimateRequest.build(args.dataset, block_size=args.block_size)
    num_blocks = -(-args.num_models // args.block_size)
    models = num_blocks * args.block_size
    cores = os.cpu_count() or 1
    direct = {n: direct_seconds(request, num_blocks, n) for n in sorted({1, cores})}
    threads = min(direct, key=direct.get)
    t_ray = ray_seconds(request, models)
    ray_rate, direct_rate = models / t_ray, models / direct[threads]
    print(f"{models} {request.model} models on {request.dataset} ({num_blocks} blocks of {args.block_size}, "
          f"{request.recipe.epochs} epochs), {cores} cores")
    for n, t in direct.items():
        print(f"  direct train_batched, 1 process x {n} threads: {t:7.1f} s  {models / t:6.2f} models/s")
    print(f"  dmm estimate, local Ray, 1 task/core (started): {t_ray:7.1f} s  {ray_rate:6.2f} models/s")
    print(f"  overhead direct/ray = {direct_rate / ray_rate:.3f} (target <= 1.15)")
    print(json.dumps({"bench": "estimate", "ray_models_per_s": round(ray_rate, 3),
                      "direct_models_per_s": round(direct_rate, 3), "overhead": round(direct_rate / ray_rate, 3),
                      "models": models, "block_size": args.block_size, "cores": cores,
                      "direct_threads": threads, "ray_startup_excluded": True}))


if __name__ == "__main__":
    main()
