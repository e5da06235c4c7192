"""Stacked vs one-at-a-time baseline unlearning: N digits models, each stackable method, one process.

The evaluation applies a method to N original models per forget set. Stacked, a method runs once
over all N (`matching.methods.STACKED_METHODS`, model n with seed n); one at a time, it runs N times
on one model (the same code with N = 1, as `dmm unlearn` runs it). Both must give the same models
(logits within 1e-4); the ratio of their times is the speed-up (target ≥ 10× per method), each side timed
after one untimed warm-up run (on a GPU the first call of a shape loads kernels and plans). Both clocks are
recorded: wall time, and the process's CPU time (all threads), which a loaded shared machine perturbs less;
`--clock` picks the one `ratio` and `min_ratio` use.

Run: python benchmarks/bench_baselines.py [--models 64] [--forget 50] [--threads 1] [--device cpu] [--clock wall]
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


def timed(f, device):
    """f()'s result and the (wall, CPU) seconds it took, the device's queued work included."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = f()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return out, np.array([time.perf_counter() - wall, time.process_time() - cpu])


def one_at_a_time(name, originals: ModelStack, data, forget, recipe, device,
                  count: int | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """The first `count` models (None: all) unlearned one after another."""
    logits, seconds = [], np.zeros(2)
    x = data.all_inputs().to(device)
    for n in range(originals.size if count is None else count):
        model = originals.module(n, like=build_model("mlp", data.input_shape, data.num_classes, 0).to(device))
        task = UnlearnTask(model=model, data=data, forget_ids=forget, store=None, original_logits=None,
                           config=METHOD_CONFIGS[name](seed=n), model_name="mlp", recipe=recipe)
        unlearned, took = timed(lambda: METHODS[name](task), device)
        seconds += took
        with torch.no_grad():
            logits.append(unlearned.model(x).cpu())
    return seconds, torch.stack(logits)


def stacked(name, originals: ModelStack, data, forget, recipe, device) -> tuple[np.ndarray, torch.Tensor]:
    task = StackedTask(originals, data, forget, METHOD_CONFIGS[name](), tuple(range(originals.size)), "mlp", recipe)
    result, seconds = timed(lambda: STACKED_METHODS[name](task), device)
    return seconds, result.stack.logits(data.all_inputs()).cpu()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=64)
    p.add_argument("--forget", type=int, default=50, help="|F|: random training ids")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the evaluation's stages use 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=sorted(STACKED_METHODS))
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="the time `ratio` compares: wall, or this process's CPU time (steadier on a shared machine)")
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
    per_method, worst, clock = {}, 0.0, ["wall", "cpu"].index(args.clock)
    for name in args.methods:
        stacked(name, originals, data, forget, recipe, args.device)  # warm-up, untimed: lazily loaded kernels,
        one_at_a_time(name, originals, data, forget, recipe, args.device, count=1)  # caches, allocator
        stacked_s, stacked_logits = stacked(name, originals, data, forget, recipe, args.device)
        single_s, single_logits = one_at_a_time(name, originals, data, forget, recipe, args.device)
        diff = float((stacked_logits - single_logits).abs().max())
        worst = max(worst, diff)
        ratios = single_s / stacked_s
        per_method[name] = {"stacked_s": round(stacked_s[0], 3), "one_at_a_time_s": round(single_s[0], 3),
                            "stacked_cpu_s": round(stacked_s[1], 3), "one_at_a_time_cpu_s": round(single_s[1], 3),
                            "ratio": round(ratios[clock], 2), "wall_ratio": round(ratios[0], 2),
                            "cpu_ratio": round(ratios[1], 2), "max_abs_diff": diff}
        print(f"{name:>15}: stacked {stacked_s[0]:7.2f} s (CPU {stacked_s[1]:7.2f} s), "
              f"one at a time {single_s[0]:7.2f} s (CPU {single_s[1]:7.2f} s), "
              f"ratio {ratios[0]:5.1f}x wall, {ratios[1]:5.1f}x CPU, max |Δlogit| {diff:.1e}", flush=True)
    min_ratio = min(r["ratio"] for r in per_method.values())
    print(f"min ratio {min_ratio:.1f}x ({args.clock} time; target >= 10x); largest logit difference {worst:.1e} "
          f"(tolerance {TOLERANCE})")
    print(json.dumps({"bench": "baselines", "min_ratio": min_ratio, "clock": args.clock, "models": args.models,
                      "threads": args.threads, "device": args.device, "per_method": per_method}))
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
