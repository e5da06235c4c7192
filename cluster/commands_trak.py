"""`dmm trak`: TRAK's estimate of β into the store's `trak/` group, calibrated on the subset models."""
from __future__ import annotations

from attribution.lds import format_report
from attribution.store import AttributionStore
from attribution.target_subset import ALL
from attribution.trak import TrakSettings, run_trak

from .commands_model import add_trust_code_arg


def trak_cmd(args) -> int:
    store = AttributionStore.open(args.store, mode="r+")
    settings = TrakSettings(checkpoints=args.checkpoints, proj_dim=args.proj_dim,
                            holdout_models=args.holdout_models, target_chunk=args.target_chunk)
    report = run_trak(store, settings, overwrite=args.overwrite, progress=True, trust_code=args.trust_code,
                      targets=args.targets)
    s = report.settings
    subset = "" if report.targets == ALL else f" of {report.fitted_targets} targets ({report.targets})"
    print(f"trak: {report.written} target chunks{subset} scored, {report.skipped} already done "
          f"(C={s.checkpoints} checkpoints, P={s.proj_dim}); calibrated on {report.calibration_models} subset "
          f"models; LDS on {s.holdout_models} held-out models -> {store.url}/trak")
    print("\n".join(format_report(report.lds)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("trak", help="TRAK scores for every target and class into the store (resumable)")
    p.add_argument("--store", required=True, help="attribution store path or fsspec URL")
    p.add_argument("--checkpoints", type=int, default=TrakSettings.checkpoints,
                   help="models trained on the full set whose scores TRAK averages")
    p.add_argument("--proj-dim", type=int, default=None,
                   help="JL projection dimension (default n_train/8, in [32, 2048]; above 100 with --checkpoints 1)")
    p.add_argument("--holdout-models", type=int, default=TrakSettings.holdout_models,
                   help="first subset models kept out of the calibration, for the LDS (as `dmm fit`)")
    p.add_argument("--target-chunk", type=int, default=TrakSettings.target_chunk,
                   help="targets per resumable chunk (scores of a chunk: n_train × chunk × k floats)")
    p.add_argument("--targets", default=ALL, metavar="SPEC",
                   help="points to score: all (default), random:T:SEED or ids:FILE (as `dmm fit --targets`)")
    p.add_argument("--overwrite", action="store_true", help="discard a trak/ group computed with other settings")
    add_trust_code_arg(p, "the store")
    p.set_defaults(func=trak_cmd)
