"""`dmm calibrate`: the deletion scales c_self, c_cross of a store's fitted β (attribution/deletion_scale.py)."""
from __future__ import annotations

from attribution.deletion_scale import (CALIBRATION_ALPHA, CALIBRATION_FULL_MODELS, CALIBRATION_MODELS, DeletionScale,
                                        calibrate)
from attribution.store import AttributionStore
from matching.direct import fitted_group
from matching.inputs import store_dataset

from .commands_model import add_trust_code_arg


def calibrate_store(url: str, attribution: str = "datamodels", models: int = CALIBRATION_MODELS,
                    alpha: float = CALIBRATION_ALPHA, device: str = "cpu", trust_code: bool = False,
                    full_models: int = CALIBRATION_FULL_MODELS, class_models: int | None = None) -> DeletionScale:
    """Fit the scales on M models trained on α'-subsets, the size effect on K trained on all of S and the whole-class
    term on K_c per class trained on S ∖ S_c (None: 16 where K >= 2), and keep them in the group (the store changes
    only at the end). `trust_code` consents to a `module:callable` model named by the store."""
    fit = fitted_group(AttributionStore.open(url, mode="r+"), attribution)
    result = calibrate(fit, store_dataset(fit.store), models=models, alpha=alpha, device=device, trust_code=trust_code,
                       full_models=full_models, class_models=class_models)
    fit.write_deletion_scale(result.to_attrs(), result.size_effect, result.forget_spread, result.class_removal)
    return result


def calibrate_cmd(args) -> int:
    r = calibrate_store(args.store, args.attribution, args.models, args.alpha, args.device, args.trust_code,
                        args.full_models, args.class_models)
    size = f"; size effect from {r.full_models} models on all of S (rms n·γ' {r.size_rms:.3f})" if r.full_models else ""
    print(f"calibrate: deletion scales c_self = {r.scale_self:.4f}, c_cross = {r.scale_cross:.4f} ({r.models} "
          f"models on α = {r.alpha} subsets, the margins of {r.targets} targets, correlation {r.correlation:.3f})"
          f"{size}; forget spread γ = {r.spread_gamma:.3f}, mean s_x {r.forget_spread.mean():.3f} -> "
          f"{args.store}/{args.attribution}; DM-Direct now predicts h(x) = f_x(θ0) − c_cross·Σ_F β − "
          f"(c_self − c_cross)·β_xx·[x ∈ F]" + (" − |F|·γ'_x" if r.full_models else "")
          + (f", and a class F holds whole moves by its measured shift ({r.class_models} models per class without it)"
             if r.class_models else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="scale the fitted β's predicted deletion effect to the full training set")
    p.add_argument("--store", required=True, help="attribution store path or fsspec URL (fitted)")
    p.add_argument("--attribution", default="datamodels", help="the fit group to calibrate: datamodels or trak")
    p.add_argument("--models", type=int, default=CALIBRATION_MODELS,
                   help="calibration models M, each trained on an α-subset")
    p.add_argument("--alpha", type=float, default=CALIBRATION_ALPHA, help="their subsets' fraction α' of the training set")
    p.add_argument("--full-models", type=int, default=CALIBRATION_FULL_MODELS,
                   help="K models trained on all of S for the training set size's effect (0: none)")
    p.add_argument("--class-models", type=int, default=None,
                   help="K_c models per class trained on S without that class, for whole-class deletions (0: none; "
                        "default 16 where --full-models >= 2, else 0); C·K_c trainings")
    p.add_argument("--device", default="cpu", help="where they train: cpu (default) or cuda[:N]")
    add_trust_code_arg(p, "the store")
    p.set_defaults(func=calibrate_cmd)
