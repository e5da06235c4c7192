"""Sequential vs model-batched training of the same K subset models (α = 0.5, default recipe).

Run: python benchmarks/bench_training.py [--dataset digits] [--models 256] [--block 256]
Prints a summary, then one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from attribution.datasets import load_dataset
from attribution.engine import train_batched, train_model
from attribution.evaluation import accuracy, model_logits
from attribution.models import build_model, default_model
from attribution.recipes import default_recipe
from attribution.subsets import block_subsets


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of float32 n×n matmul rate on this machine: the ceiling any trainer could reach."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops_per_sample(model_name: str, data, batch: int) -> float:
    """Forward + backward FLOPs of one training sample (counted by torch's FlopCounterMode)."""
    model = build_model(model_name, data.input_shape, data.num_classes, seed=0)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(data.x_train[:batch]), data.y_train[:batch]).backward()
    return counter.get_total_flops() / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--models", type=int, default=256)
    parser.add_argument("--block", type=int, default=256, help="models per batched pass")
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args()

    data = load_dataset(args.dataset, download=True)
    model_name = default_model(data.name)
    recipe = default_recipe(data.name, model_name)
    masks, seeds = block_subsets(0, 0, args.models, data.n_train, args.alpha)

    start = time.perf_counter()
    seq_acc = []
    for seed, mask in tqdm(list(zip(seeds, masks)), desc="sequential", unit="model"):
        model = train_model(model_name, data, recipe, int(seed), mask)
        seq_acc.append(accuracy(model_logits(model, data.x_test), data.y_test))
    sequential_s = time.perf_counter() - start

    start = time.perf_counter()
    batched_acc = []
    for lo in tqdm(range(0, args.models, args.block), desc="batched", unit="block"):
        result = train_batched(model_name, data, recipe, seeds[lo:lo + args.block], masks[lo:lo + args.block])
        batched_acc += [accuracy(lg, data.y_test) for lg in result.logits[:, data.n_train:]]
    batched_s = time.perf_counter() - start

    sample_steps = recipe.epochs * masks.sum()
    achieved = flops_per_sample(model_name, data, recipe.batch_size) * sample_steps / batched_s / 1e9
    row = {
        "bench": "training", "dataset": data.name, "models": args.models,
        "sequential_models_per_s": round(args.models / sequential_s, 3),
        "batched_models_per_s": round(args.models / batched_s, 3),
        "ratio": round(sequential_s / batched_s, 2),
        "sequential_acc": round(float(np.mean(seq_acc)), 4),
        "batched_acc": round(float(np.mean(batched_acc)), 4),
        "achieved_gflops": round(achieved, 2),
        "matmul_peak_gflops": round(matmul_peak_gflops(), 1),
    }
    print(f"{args.models} {model_name} models on {data.name}: sequential {sequential_s:.1f} s, "
          f"batched {batched_s:.1f} s (x{row['ratio']}); mean held-out accuracy "
          f"{row['sequential_acc']:.4f} vs {row['batched_acc']:.4f}")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
