"""Benchmark: the datamodel fit with fewer subset models than half the points, on the design's factor vs its Gram.

    python benchmarks/bench_fit_factored.py [--targets T] [--models M,...] [--val-fraction F] [--seed S]

With m fitting models over n points and 2m < n, `lasso_stats.build_design` keeps F = X_c/√m (m × n) instead of
G = FᵀF (n × n), and every FISTA iteration computes G·W as Fᵀ(F·W): 2·m·n·t flops instead of n²·t. For each M,
one chunk of T synthetic targets (`bench_fit.load_problem`: α = 0.5 masks over n = 1,437 points, the digits
train split; M models of which ⌈F·M⌉ validate λ) is fitted by `fit_datamodels` twice in this process: on the
dense Gram (`lasso_stats.factored` forced False: what every fit did before) and on the factor. Reported per M:
both wall times and their ratio, whether every target chose the same λ, and the largest relative difference of
the refit's objective (½‖y − b − Xw‖²/m + λ‖w‖₁ on train + val, float64 from residuals). M = 52 is
`dmm demo --num-models 64`'s fitting models, 180 the test suite's stores'.

The last line printed is one JSON object; `min_ratio` is the smallest dense / factored wall-time ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]

from attribution import lasso_stats  # noqa: E402
from attribution.lasso import fit_datamodels, lasso_objective  # noqa: E402
from bench_fit import load_problem  # noqa: E402


def timed_fit(Xtr, Ytr, Xva, Yva, factored: bool):
    """(wall s, fit) of `fit_datamodels` with the design factored where 2m < n, or always the dense Gram."""
    real = lasso_stats.factored
    if not factored:
        lasso_stats.factored = lambda m, n: False
    try:
        start = time.perf_counter()
        fit = fit_datamodels(Xtr, Ytr, Xva, Yva, warn=False)  # targets at max_iter: about as many on both sides
        return time.perf_counter() - start, fit
    finally:
        lasso_stats.factored = real


def compare(targets: int, models: int, val_fraction: float, seed: int) -> dict:
    val = math.ceil(val_fraction * models)
    Xtr, Ytr, Xva, Yva = load_problem(targets, models - val, val, seed=seed)
    assert lasso_stats.factored(models, Xtr.shape[1]), f"{models} models over {Xtr.shape[1]} points: not factored"
    dense_s, dense = timed_fit(Xtr, Ytr, Xva, Yva, factored=False)
    factor_s, factor = timed_fit(Xtr, Ytr, Xva, Yva, factored=True)
    X, Y = np.concatenate([Xtr, Xva]), np.concatenate([Ytr, Yva])
    objective = [lasso_objective(X, Y, f.weight, f.bias, f.lam.astype(np.float64)) for f in (dense, factor)]
    gap = float(np.max(np.abs(objective[1] - objective[0]) / objective[0]))
    same_lam = float(np.mean(dense.lam == factor.lam))
    print(f"M = {models} ({models - val} train + {val} val) × n = {Xtr.shape[1]}, {targets} targets: dense Gram "
          f"{dense_s:.2f} s, factor {factor_s:.2f} s, ratio {dense_s / factor_s:.2f}; the same λ for "
          f"{same_lam:.1%} of targets, objective max relative difference {gap:.2e}", flush=True)
    return {"models": models, "dense_s": round(dense_s, 3), "factor_s": round(factor_s, 3),
            "ratio": round(dense_s / factor_s, 3), "same_lambda": same_lam, "max_rel_objective_diff": gap}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=256)
    ap.add_argument("--models", default="52,180", help="comma-separated fitting-model counts, each < n/2")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    runs = [compare(args.targets, int(m), args.val_fraction, args.seed) for m in args.models.split(",")]
    result = {"bench": "fit_factored", "targets": args.targets, "runs": runs,
              "min_ratio": min(r["ratio"] for r in runs)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
