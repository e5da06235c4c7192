"""Stacked vs one-at-a-time baseline unlearning: N digits models, each stackable method, one process.

The evaluation applies a method to N original models per forget set. Stacked, a method runs once
over all N (`matching.methods.STACKED_METHODS`, model n with seed n); one at a time, it runs N times
on one model (the same code with N = 1, as `dmm unlearn` runs it). Both must give the same models
(logits within 1e-4); the ratio of their wall times is the speed-up (target ≥ 10× per method).

Run: python benchmarks/bench_baselines.py [--models 64] [--forget 50] [--threads 1] [--device cpu]
Prints a summary, then one JSON line last; exits 1 if a stacked result differs from the one-model runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from attribution.datasets import load_dataset
from attribution.engine import train_batched
from attribution.models import build_model
from attribution.recipes import default_recipe
from matching.baselines.stack import ModelStack, StackedTask
from matching.methods import METHOD_CONFIGS, METHODS, STACKED_METHODS, UnlearnTask

TOLERANCE = 1e-4


def one_at_a_time(name, originals: ModelStack, data, forget, recipe, device) -> tuple[float, torch.Tensor]:
    logits, seconds = [], 0.0
    x = data.all_inputs().to(device)
    for n in range(originals.size):
        model = originals.module(n, like=build_model("mlp", data.input_shape, data.num_classes, 0).to(device))
        task = UnlearnTask(model=model, data=data, forget_ids=forget, store=None, original_logits=None,
                           config=METHOD_CONFIGS[name](seed=n), model_name="mlp", recipe=recipe)
        start = time.perf_counter()
        unlearned = METHODS[name](task)
        seconds += time.perf_counter() - start
        with torch.no_grad():
            logits.append(unlearned.model(x).cpu())
    return seconds, torch.stack(logits)


def stacked(name, originals: ModelStack, data, forget, recipe) -> tuple[float, torch.Tensor]:
    task = StackedTask(originals, data, forget, METHOD_CONFIGS[name](), tuple(range(originals.size)), "mlp", recipe)
    start = time.perf_counter()
    result = STACKED_METHODS[name](task)
    seconds = time.perf_counter() - start
    return seconds, result.stack.logits(data.all_inputs()).cpu()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=64)
    p.add_argument("--forget", type=int, default=50, help="|F|: random training ids")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the evaluation's stages use 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=sorted(STACKED_METHODS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data, recipe = load_dataset("digits"), default_recipe("digits", "mlp")
    start = time.perf_counter()
    trained = train_batched("mlp", data, recipe, list(range(args.models)), np.ones((args.models, data.n_train), bool),
                            device=args.device)
    base = build_model("mlp", data.input_shape, data.num_classes, 0)
    originals = ModelStack(base.to("meta"), {k: v for k, v in trained.state.items()}, {})
    forget = np.sort(np.random.default_rng(0).choice(data.n_train, args.forget, replace=False))
    print(f"{args.models} digits mlp originals trained in {time.perf_counter() - start:.1f} s; |F| = {args.forget}, "
          f"{args.threads} thread(s), {args.device}", flush=True)
    per_method, worst = {}, 0.0
    for name in args.methods:
        stacked_s, stacked_logits = stacked(name, originals, data, forget, recipe)
        single_s, single_logits = one_at_a_time(name, originals, data, forget, recipe, args.device)
        diff = float((stacked_logits - single_logits).abs().max())
        worst = max(worst, diff)
        per_method[name] = {"stacked_s": round(stacked_s, 3), "one_at_a_time_s": round(single_s, 3),
                            "ratio": round(single_s / stacked_s, 2), "max_abs_diff": diff}
        print(f"{name:>13}: stacked {stacked_s:7.2f} s, one at a time {single_s:7.2f} s, "
              f"ratio {single_s / stacked_s:5.1f}x, max |Δlogit| {diff:.1e}", flush=True)
    min_ratio = min(r["ratio"] for r in per_method.values())
    print(f"min ratio {min_ratio:.1f}x (target >= 10x); largest logit difference {worst:.1e} (tolerance {TOLERANCE})")
    print(json.dumps({"bench": "baselines", "min_ratio": min_ratio, "models": args.models, "threads": args.threads,
                      "device": args.device, "per_method": per_method}))
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
