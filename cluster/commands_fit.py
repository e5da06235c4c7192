"""`dmm fit`: fit the datamodels of a store (see cluster/fit.py)."""
from __future__ import annotations

import zarr

from .fit import FitConfig, fit_store, format_report


def fit_cmd(args) -> int:
    if zarr.config.get("threading.max_workers") is None:
        # Reading one target chunk decodes whole block chunks of subsets/logits (block_size × n_points × k);
        # decoded on zarr's default thread pool, each pool thread keeps such buffers in its own malloc arena
        # and peak RSS grows with n_points. One decode thread keeps it flat (the solve dominates the time).
        zarr.config.set({"threading.max_workers": 1})
    config = FitConfig(holdout_models=args.holdout_models, path_length=args.path_length,
                       tol=args.tol, max_iter=args.max_iter, targets_per_chunk=args.targets_per_chunk,
                       rows_per_chunk=args.rows_per_chunk, device=args.device, max_task_memory_gb=args.max_task_memory,
                       targets=args.targets)
    report = fit_store(args.store, config, address=args.address, workers=args.workers)
    print("\n".join(format_report(report)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("fit", help="fit the L1 datamodels of every target into the store (resumable)")
    p.add_argument("--store", required=True, help="attribution store path or fsspec URL")
    p.add_argument("--holdout-models", type=int, default=FitConfig.holdout_models,
                   help="subset models kept out of fitting, for the LDS")
    p.add_argument("--path-length", type=int, default=FitConfig.path_length, help="λ values per path")
    p.add_argument("--tol", type=float, default=FitConfig.tol,
                   help="the solver's relative duality gap at which a regression stops (default %(default)g; a group "
                        "fitted before it was the default resumes with --tol 1e-5)")
    p.add_argument("--max-iter", type=int, default=FitConfig.max_iter, help="the solver's iterations per λ at most")
    p.add_argument("--targets-per-chunk", type=int, default=FitConfig.targets_per_chunk,
                   help="points per task (each has k regressions); memory grows with it")
    p.add_argument("--rows-per-chunk", type=int, default=FitConfig.rows_per_chunk,
                   help="training points per β chunk: small makes DM-Direct's read of F's rows cheap")
    p.add_argument("--device", default=FitConfig.device,
                   help="where the solver runs: cpu (default) or cuda[:N] (on a Ray cluster, each worker's GPU)")
    p.add_argument("--max-task-memory", type=float, metavar="GB",
                   help="refuse a fit whose task needs more (shared Gram 2·n²·4 B + masks + one target chunk); "
                        "the error names the largest --targets-per-chunk that fits")
    p.add_argument("--targets", default=FitConfig.targets, metavar="SPEC",
                   help="points to fit β for: all (default), random:T:SEED or ids:FILE (one point index a line: "
                        "train points, then held-out); requests and LDS then use only these targets")
    p.add_argument("--address", help="Ray cluster (Dask-on-Ray) or tcp:// dask.distributed scheduler")
    p.add_argument("--workers", type=int, default=1, help="local threads (each solve is itself multi-threaded)")
    p.set_defaults(func=fit_cmd)
