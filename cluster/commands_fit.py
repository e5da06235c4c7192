"""`dmm fit`: fit the datamodels of a store (see cluster/fit.py)."""
from __future__ import annotations

from .fit import FitConfig, fit_store, format_report


def fit_cmd(args) -> int:
    config = FitConfig(holdout_models=args.holdout_models, path_length=args.path_length,
                       targets_per_chunk=args.targets_per_chunk)
    report = fit_store(args.store, config, address=args.address, workers=args.workers)
    print("\n".join(format_report(report)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("fit", help="fit the L1 datamodels of every target into the store (resumable)")
    p.add_argument("--store", required=True, help="attribution store path or fsspec URL")
    p.add_argument("--holdout-models", type=int, default=FitConfig.holdout_models,
                   help="subset models kept out of fitting, for the LDS")
    p.add_argument("--path-length", type=int, default=FitConfig.path_length, help="λ values per path")
    p.add_argument("--targets-per-chunk", type=int, default=FitConfig.targets_per_chunk,
                   help="points per task (each has k regressions); memory grows with it")
    p.add_argument("--address", help="Ray cluster (Dask-on-Ray) or tcp:// dask.distributed scheduler")
    p.add_argument("--workers", type=int, default=1, help="local threads (each solve is itself multi-threaded)")
    p.set_defaults(func=fit_cmd)
