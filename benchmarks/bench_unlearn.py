"""One converged DMM deletion request vs one full retrain, per dataset (digits, mnist1d), in one process.

Setup per dataset (not timed): a store of the dataset's default model and recipe with --models subset
models and datamodels fitted with a short λ path (β's quality does not enter the request's fixed costs,
and a full λ path on every target takes minutes to hours), and θ0 trained on all of S.
Timed, median of --repeats runs each: `unlearn_request` end to end on a fresh copy of the store, split into
its parts (`matching.request.REQUEST_PARTS`: open, checks, targets = reading F's β rows for DM-Direct,
finetune, writes; the fixed overhead is the median over runs of each request's time but its fine-tuning),
and `train_model` on S∖F with the same recipe (seeds 1, 2, ...), right after each request; besides the ratio of
the medians, each run's request over its own retrain (`ratio_wall_runs`: how far a shared machine's drift
moves the ratio). Compute is also
counted in per-sample gradient evaluations: the matching's Σ batch sizes vs the retrain's epochs · |S∖F|.
Everything runs on one thread after torch's lazily imported optimiser machinery is loaded.

Targets (issue 13): fixed overhead (everything but the fine-tuning) ≤ 50 ms on digits; the whole
request on mnist1d ≤ 10 % of its retrain's wall time.

Run: python benchmarks/bench_unlearn.py [--datasets digits mnist1d] [--forget 50] [--repeats 3] [--setup-dir DIR]
(--setup-dir keeps the setup — mnist1d's takes about 16 min on one thread — for the next run.)
Prints a summary per dataset, then one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from attribution.datasets import load_dataset  # noqa: E402
from attribution.engine import train_model  # noqa: E402
from attribution.models import default_model  # noqa: E402
from attribution.recipes import default_recipe  # noqa: E402
from fixtures_store import DigitsStore, build_store, copy_store, train_and_save  # noqa: E402
from matching.request import REQUEST_PARTS, unlearn_request  # noqa: E402

BENCH_LASSO = dict(path_length=2, min_ratio=0.1, tol=1e-2, max_iter=5)
SUBSET_MODELS = {"digits": 200, "mnist1d": 64}  # enough for β to be a real (if noisy) L1 fit


def setup(name: str, data, model: str, recipe, setup_dir: Path) -> tuple[DigitsStore, Path]:
    """The store and θ0 under setup_dir: built once (a marker file says so), reused by every later run."""
    models, url = SUBSET_MODELS[name], setup_dir / f"{name}.zarr"
    theta0 = setup_dir / f"{name}-theta0.safetensors"
    done = setup_dir / f"{name}-setup.done"
    if done.exists():
        print(f"{name}: setup reused from {setup_dir}", flush=True)
        return DigitsStore(str(url), data, recipe, model), theta0
    start = time.perf_counter()
    fixture = build_store(url, data, models, max(2, models // 10), BENCH_LASSO, model, recipe)
    train_and_save(fixture, [theta0], [0])
    done.touch()
    print(f"{name}: setup ({models} subset models, datamodels, θ0) {time.perf_counter() - start:.1f} s", flush=True)
    return fixture, theta0


def bench_dataset(name: str, n_forget: int, repeats: int, tmp: Path, setup_dir: Path) -> dict:
    data = load_dataset(name)
    model = default_model(name)
    recipe = default_recipe(name, model)
    forget = np.sort(np.random.default_rng(0).choice(data.n_train, n_forget, replace=False))
    retain = np.ones(data.n_train, dtype=bool)
    retain[forget] = False
    fixture, theta0 = setup(name, data, model, recipe, setup_dir)

    totals, parts, retrains, grads, steps = [], [], [], [], []
    for run in range(repeats):
        store = copy_store(fixture, tmp / f"{name}-{run}.zarr")
        os.sync()  # the copy's writeback (mnist1d: 0.8 GB in 176k files) would otherwise run beside the timings
        start = time.perf_counter()
        result = unlearn_request(store, theta0, forget, out=tmp / f"{name}-unlearned-{run}.safetensors")
        totals.append(time.perf_counter() - start)
        parts.append(result.parts)
        grads.append(result.stats["sample_grads"])
        steps.append(result.stats["steps"])
        start = time.perf_counter()
        train_model(model, data, recipe, seed=1 + run, mask=retain)
        retrains.append(time.perf_counter() - start)
        print(f"  run {run}: {result.message}", flush=True)
    total_s, retrain_s = float(np.median(totals)), float(np.median(retrains))
    part_s = {p: float(np.median([r[p] for r in parts])) for p in REQUEST_PARTS}
    retrain_grads = recipe.epochs * int(retain.sum())
    paired = sorted(t / r for t, r in zip(totals, retrains))  # each request over the retrain timed right after it
    row = {"request_s": round(total_s, 4), "retrain_s": round(retrain_s, 4),
           "parts_s": {p: round(v, 4) for p, v in part_s.items()},
           "fixed_overhead_s": round(float(np.median([t - r["finetune"] for t, r in zip(totals, parts)])), 4),
           "ratio_wall": round(total_s / retrain_s, 4), "ratio_wall_runs": [round(r, 4) for r in paired],
           "steps": int(np.median(steps)), "sample_grads": int(np.median(grads)), "retrain_sample_grads": retrain_grads,
           "ratio_grads": round(float(np.median(grads)) / retrain_grads, 4), "n_forget": n_forget}
    print(f"{name}: request {total_s * 1e3:.1f} ms = " + " + ".join(f"{p} {v * 1e3:.1f}" for p, v in part_s.items())
          + f" ms; fixed overhead {row['fixed_overhead_s'] * 1e3:.1f} ms; retrain {retrain_s:.2f} s; ratio "
          f"{row['ratio_wall']:.1%} in wall time (runs {paired[0]:.1%}–{paired[-1]:.1%}), "
          f"{row['ratio_grads']:.1%} in sample-gradients ({row['sample_grads']} vs {retrain_grads}; "
          f"{row['steps']} matching steps)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", nargs="+", default=list(SUBSET_MODELS), choices=list(SUBSET_MODELS))
    parser.add_argument("--forget", type=int, default=50, help="|F|")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the median is reported")
    parser.add_argument("--setup-dir", type=Path, default=None,
                        help="keep the untimed setup (store, θ0) here and reuse it on later runs (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # loads torch._dynamo once, outside every timing
    with tempfile.TemporaryDirectory() as tmp:
        setup_dir = args.setup_dir or Path(tmp)
        setup_dir.mkdir(parents=True, exist_ok=True)
        rows = {name: bench_dataset(name, args.forget, args.repeats, Path(tmp), setup_dir) for name in args.datasets}
    summary = {"bench": "unlearn", "datasets": rows}
    if "digits" in rows:
        summary["fixed_overhead_s"] = rows["digits"]["fixed_overhead_s"]
    if "mnist1d" in rows:
        summary["ratio_mnist1d"] = rows["mnist1d"]["ratio_wall"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
