"""One DMM deletion request vs one full retrain on digits, in the same process (target: DMM ≤ 5 %).

Setup (not timed): a digits store with subset models and datamodels fitted with a short λ path
(β's quality does not enter the timing, and a full λ path on all 17 970 targets takes minutes), and
θ0 trained on all of S. Timed, median of --repeats runs each: `unlearn_request` end to end on a
fresh copy of the store (checks, θ0's logits, reading F's β rows, fine-tuning, writing the model,
θ0's logits and the ledger entry), and `train_model` on S∖F with the same recipe (seeds 1, 2, ...).
Both run on one thread after torch's lazily imported optimiser machinery is loaded.

Run: python benchmarks/bench_unlearn.py [--models 200] [--forget 50] [--repeats 3]
Prints a summary, then one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from attribution.datasets import load_dataset  # noqa: E402
from attribution.engine import train_model  # noqa: E402
from attribution.store import AttributionStore  # noqa: E402
from fixtures_store import MODEL, build_store, copy_store, train_and_save  # noqa: E402
from matching.direct import fitted_group, forget_effect  # noqa: E402
from matching.request import unlearn_request  # noqa: E402

BENCH_LASSO = dict(path_length=2, min_ratio=0.1, tol=1e-2, max_iter=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=200, help="subset models in the store")
    parser.add_argument("--forget", type=int, default=50, help="|F|")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the median is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # loads torch._dynamo once, outside both timings

    data = load_dataset("digits")
    forget = np.sort(np.random.default_rng(0).choice(data.n_train, args.forget, replace=False))
    retain = np.ones(data.n_train, dtype=bool)
    retain[forget] = False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        fixture = build_store(tmp / "store.zarr", data, args.models, max(2, args.models // 10), BENCH_LASSO)
        (theta0,) = train_and_save(fixture, [tmp / "theta0.safetensors"], [0])
        print(f"setup: {args.models} subset models, datamodels, θ0 in {time.perf_counter() - start:.1f} s")

        dmm_runs, method_runs, read_runs, retrain_runs = [], [], [], []
        for run in range(args.repeats):
            store = copy_store(fixture, tmp / f"store-{run}.zarr")
            start = time.perf_counter()
            result = unlearn_request(store, theta0, forget, out=tmp / f"unlearned-{run}.safetensors")
            dmm_runs.append(time.perf_counter() - start)
            method_runs.append(result.method_s)
            start = time.perf_counter()  # the part of the request that is Zarr reading Σ_{i∈F} β_i alone
            forget_effect(fitted_group(AttributionStore.open(store), "datamodels"), forget)
            read_runs.append(time.perf_counter() - start)
            start = time.perf_counter()
            train_model(MODEL, data, fixture.recipe, seed=1 + run, mask=retain)
            retrain_runs.append(time.perf_counter() - start)
        print(result.message)
    dmm_s, method_s, read_s, retrain_s = (float(np.median(runs))
                                          for runs in (dmm_runs, method_runs, read_runs, retrain_runs))
    print(f"DMM request {dmm_s:.3f} s (runs {', '.join(f'{t:.3f}' for t in dmm_runs)}; of which targets + "
          f"fine-tuning {method_s:.3f} s; reading F's β rows alone {read_s:.3f} s), retrain {retrain_s:.3f} s (runs {', '.join(f'{t:.3f}' for t in retrain_runs)})"
          f", ratio {dmm_s / retrain_s:.1%} (target ≤ 5%)")
    print(json.dumps({"bench": "unlearn", "dmm_s": round(dmm_s, 4), "retrain_s": round(retrain_s, 4),
                      "ratio": round(dmm_s / retrain_s, 4), "dmm_method_s": round(method_s, 4), "beta_read_s": round(read_s, 4),
                      "n_forget": args.forget}))


if __name__ == "__main__":
    main()
