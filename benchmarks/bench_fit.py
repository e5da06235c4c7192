"""Benchmark: batched datamodel solver vs. a loop of scikit-learn ``Lasso`` fits; shared vs per-chunk design.

    python benchmarks/bench_fit.py [--targets T] [--models M] [--val-models V]
                                   [--sklearn-targets K] [--chunk C] [--seed S]

1. ``load_problem`` builds one chunk: 0/1 masks (α = 0.5, n = 1437 like the
   sklearn-digits train split), M train + V validation subset models, T
   targets with a sparse linear response plus noise.  Swap this function to
   read a real attribution store.
2. ``fit_datamodels`` (λ path, λ chosen on validation, refit) — timed as
   ``ours_fit_s`` — gives the selected λ per target.
3. The *same problem* — every target at its selected λ on the train+val
   design — is solved by ``solve_lasso`` (cold start, timed as ``ours_s``)
   and by ``sklearn.linear_model.Lasso(alpha=λ, fit_intercept=True)`` one
   target at a time (timed as ``sklearn_s``; if K < T only K evenly spaced
   targets are fitted and the time is extrapolated per target, reported as
   ``sklearn_targets_timed``).
4. Objectives of both are evaluated in float64 from residuals;
   max_rel_objective_gap = max_j (ours_j − sklearn_j) / sklearn_j over the
   sklearn-fitted targets (negative means ours is lower).
5. Shared design, before vs after: the T targets fitted in chunks of C (as `dmm fit` does), first with
   every chunk building its own design (XᵀX, x̄, ‖G‖₂ of train and train + val: what each task did
   before), then with one ``build_design`` shared by every chunk; times ``per_chunk_design_s`` and
   ``shared_design_s`` (design included), ``design_ratio`` = before / after (``design_cpu_ratio`` in
   process CPU time, steadier on a shared machine), ``design_build_s`` for one design, and whether
   every chunk's β, β0, λ are bitwise equal (``design_bitwise``).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attribution.lasso import fit_datamodels, lasso_objective, solve_lasso  # noqa: E402
from attribution.lasso_stats import build_design  # noqa: E402


def load_problem(targets: int = 1024, models: int = 2000, val_models: int = 200,
                 n: int = 1437, alpha: float = 0.5, seed: int = 0):
    """Synthetic datamodel chunk: returns X_train, Y_train, X_val, Y_val.

    X: (models, n) float32 0/1 masks, each point included with prob. alpha.
    Y: (models, targets) float32; y_j = b_j + X β_j + ε_j with β_j sparse
    (10–60 nonzeros, heavy-tailed), b_j ~ N(0, 3²) (logit-like offsets), and
    noise set so the signal fraction R² is uniform in [0.05, 0.8].
    """
    rng = np.random.default_rng(seed)
    m = models + val_models
    X = (rng.random((m, n)) < alpha).astype(np.float32)
    B = np.zeros((n, targets), dtype=np.float64)
    for j in range(targets):
        k = int(rng.integers(10, 61))
        idx = rng.choice(n, size=k, replace=False)
        B[idx, j] = rng.standard_t(3, size=k) * 0.1
    signal = (X - alpha) @ B
    var_s = signal.var(0) + 1e-12
    r2 = rng.uniform(0.05, 0.8, size=targets)
    sigma = np.sqrt(var_s * (1 - r2) / r2)
    Y = rng.normal(0, 3, size=targets) + signal + rng.normal(size=(m, targets)) * sigma
    Y = Y.astype(np.float32)
    return X[:models], Y[:models], X[models:], Y[models:]


def fit_in_chunks(Xtr, Ytr, Xva, Yva, chunk: int, shared: bool):
    """(wall s, CPU s, fits) of the targets fitted `chunk` at a time, with one shared design or one per chunk."""
    t0, c0 = time.perf_counter(), time.process_time()
    design = build_design(Xtr, Xva) if shared else None
    fits = [fit_datamodels(Xtr, Ytr[:, j:j + chunk], Xva, Yva[:, j:j + chunk], design=design)
            for j in range(0, Ytr.shape[1], chunk)]
    return time.perf_counter() - t0, time.process_time() - c0, fits


def compare_designs(Xtr, Ytr, Xva, Yva, chunk: int) -> dict:
    """Step 5: per-chunk design (before) vs one shared design (after), in this process."""
    before_s, before_cpu, before = fit_in_chunks(Xtr, Ytr, Xva, Yva, chunk, shared=False)
    after_s, after_cpu, after = fit_in_chunks(Xtr, Ytr, Xva, Yva, chunk, shared=True)
    t0 = time.perf_counter()
    build_design(Xtr, Xva)
    build_s = time.perf_counter() - t0
    bitwise = all(getattr(a, f).tobytes() == getattr(b, f).tobytes()
                  for a, b in zip(before, after) for f in ("weight", "bias", "lam"))
    print(f"{len(before)} chunks of {chunk} targets: per-chunk design {before_s:.2f} s ({before_cpu:.2f} CPU s), "
          f"shared design {after_s:.2f} s ({after_cpu:.2f} CPU s): ratio {before_s / after_s:.2f} "
          f"(CPU {before_cpu / after_cpu:.2f}); one design {build_s:.2f} s; β, β0, λ bitwise equal: {bitwise}")
    return {"chunks": len(before), "chunk": chunk, "per_chunk_design_s": round(before_s, 3),
            "shared_design_s": round(after_s, 3), "design_ratio": round(before_s / after_s, 3),
            "design_cpu_ratio": round(before_cpu / after_cpu, 3), "design_build_s": round(build_s, 3),
            "design_bitwise": bitwise}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=1024)
    ap.add_argument("--models", type=int, default=2000)
    ap.add_argument("--val-models", type=int, default=200)
    ap.add_argument("--sklearn-targets", type=int, default=None,
                    help="fit only this many targets with sklearn and extrapolate (default: all)")
    ap.add_argument("--chunk", type=int, default=256, help="targets per chunk in step 5 (as --targets-per-chunk)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from sklearn.linear_model import Lasso

    Xtr, Ytr, Xva, Yva = load_problem(args.targets, args.models, args.val_models, seed=args.seed)
    t = Ytr.shape[1]
    print(f"problem: {Xtr.shape[0]} train + {Xva.shape[0]} val models, n={Xtr.shape[1]}, "
          f"targets={t}, torch threads={torch.get_num_threads()}")

    t0 = time.perf_counter()
    fit = fit_datamodels(Xtr, Ytr, Xva, Yva)
    ours_fit_s = time.perf_counter() - t0
    print(f"fit_datamodels (path + select + refit): {ours_fit_s:.2f} s")

    X = np.concatenate([Xtr, Xva])
    Y = np.concatenate([Ytr, Yva])
    lam = fit.lam.astype(np.float64)

    t0 = time.perf_counter()
    W, b = solve_lasso(X, Y, lam)
    ours_s = time.perf_counter() - t0
    print(f"solve_lasso at selected λ, cold start: {ours_s:.2f} s")

    ours_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    k = t if args.sklearn_targets is None else max(1, min(t, args.sklearn_targets))
    cols = np.unique(np.linspace(0, t - 1, k).round().astype(int))
    X64 = X.astype(np.float64)
    Wsk = np.zeros((X.shape[1], cols.size))
    bsk = np.zeros(cols.size)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, j in enumerate(cols):
            est = Lasso(alpha=float(lam[j]), fit_intercept=True).fit(X64, Y[:, j].astype(np.float64))
            Wsk[:, i] = est.coef_
            bsk[i] = est.intercept_
    sk_elapsed = time.perf_counter() - t0
    sklearn_s = sk_elapsed * t / cols.size

    f_ours = lasso_objective(X, Y[:, cols], W[:, cols], b[cols], lam[cols])
    f_sk = lasso_objective(X, Y[:, cols], Wsk, bsk, lam[cols])
    rel = (f_ours - f_sk) / f_sk
    fit_obj = lasso_objective(X, Y[:, cols], fit.weight[:, cols], fit.bias[cols], lam[cols])
    rel_fit = (fit_obj - f_sk) / f_sk
    nnz = (W != 0).sum(0)
    designs = compare_designs(Xtr, Ytr, Xva, Yva, args.chunk)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    print(f"sklearn Lasso loop: {sk_elapsed:.2f} s for {cols.size} targets"
          + (f" (→ {sklearn_s:.2f} s for {t})" if cols.size < t else ""))
    print(f"ratio sklearn/ours (same fixed-λ problem): {sklearn_s / ours_s:.1f}x; "
          f"sklearn/fit_datamodels (ours incl. path+selection): {sklearn_s / ours_fit_s:.1f}x")
    print(f"rel objective gap (ours − sklearn)/sklearn: max {rel.max():.2e}, median {np.median(rel):.2e}; "
          f"fit_datamodels refit max {rel_fit.max():.2e}")
    print(f"selected λ/λ_max median {np.median(lam / np.maximum(np.abs((X - X.mean(0)).T @ (Y - Y.mean(0))).max(0) / X.shape[0], 1e-30)):.3f}; "
          f"nonzeros per target median {int(np.median(nnz))}; val MSE median {np.median(fit.val_mse):.3g}")
    out = {
        "bench": "fit",
        "targets": int(t),
        "models": int(X.shape[0]),
        "n": int(X.shape[1]),
        "sklearn_s": round(sklearn_s, 3),
        "ours_s": round(ours_s, 3),
        "ratio": round(sklearn_s / ours_s, 2),
        "ours_fit_s": round(ours_fit_s, 3),
        "ratio_incl_path": round(sklearn_s / ours_fit_s, 2),
        "max_rel_objective_gap": float(f"{rel.max():.3e}"),
        "peak_rss_mb": round(peak_mb, 1),
        "ours_peak_rss_mb": round(ours_peak_mb, 1),
        "threads": torch.get_num_threads(),
        **designs,
    }
    if cols.size < t:
        out["sklearn_targets_timed"] = int(cols.size)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
