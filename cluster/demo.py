"""`dmm demo`: the product's main job on the embedded default (digits + MLP), end to end.

estimate (subset models, Ray) → fit (datamodels, Dask) → train θ0 → two DMM deletion requests of 50
random training ids each → compare with a model retrained without those 100 ids → KLoM of DMM on
those ids against a small oracle set (`dmm evaluate` with N = 20), next to θ0's and the floor's. The
expensive stages are resumable, so a second run reuses the store; the requests are fresh every run.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from attribution.checkpoint import load_model, model_meta, save_model
from attribution.datasets import DEFAULT_DATASET, load_dataset
from attribution.class_removal import CALIBRATION_CLASS_MODELS
from attribution.deletion_scale import CALIBRATION_ALPHA, CALIBRATION_FULL_MODELS, CALIBRATION_MODELS
from attribution.engine import train_model
from attribution.evaluation import accuracy, model_logits
from matching.ledger import LEDGER
from matching.request import unlearn_request

from .commands_calibrate import calibrate_store
from .fit import fit_store, format_report, resume_config


KLOM_MODELS = 20  # N per population: enough to see the gap, small enough for the demo (floor ≈ 5 on digits)


def _stage(name: str):
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def _row(name: str, logits: torch.Tensor, data, forget: np.ndarray, retrained: torch.Tensor) -> str:
    n = data.n_train
    labels = data.all_labels()
    retain = np.setdiff1d(np.arange(n), forget)
    held_out = np.arange(n, data.n_points)
    dist = ((logits[forget] - retrained[forget]) ** 2).sum(1).mean().item()
    return (f"{name:<12} {accuracy(logits, labels, forget):>8.3f} {accuracy(logits, labels, retain):>8.3f} "
            f"{accuracy(logits, labels, held_out):>9.3f} {dist:>16.3f}")


def run_demo(out_dir: str = "demo_out", num_models: int = 2048, forget_per_request: int = 50,
             address: str | None = None, seed: int = 0) -> None:
    from .estimate import EstimateRequest, run_estimate  # imports Ray: not at `dmm`'s start

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(DEFAULT_DATASET)
    store_url = str(out / "store.zarr")
    request = EstimateRequest.build(data.name, block_size=64, seed=seed)

    t = _stage(f"estimate: {num_models} subset models (α = {request.alpha}) on {data.name}")
    result = run_estimate(request, store_url, num_models, address=address)
    print(f"trained {result.trained} blocks, skipped {result.skipped} ({time.perf_counter() - t:.0f} s)")

    t = _stage("fit: L1 datamodels of every (point, class)")
    report = fit_store(store_url, resume_config(store_url))  # a store fitted under other settings is finished with them
    print("\n".join(format_report(report)) + f" ({time.perf_counter() - t:.0f} s)")

    t = _stage(f"calibrate: β's deletion scales ({CALIBRATION_MODELS} models on α' = {CALIBRATION_ALPHA} subsets), "
               f"the training set size's effect ({CALIBRATION_FULL_MODELS} models on all of S) and whole-class deletions "
               f"({CALIBRATION_CLASS_MODELS} models per class without it)")
    c = calibrate_store(store_url)
    print(f"c_self = {c.scale_self:.3f}, c_cross = {c.scale_cross:.3f} (on the margins of {c.targets} targets, "
          f"correlation {c.correlation:.3f}); rms n·γ' {c.size_rms:.3f}; DMM's spread on F: γ = {c.spread_gamma:.3f}, "
          f"mean s_x {c.forget_spread.mean():.3f}; {c.class_models * data.num_classes} class models "
          f"({time.perf_counter() - t:.0f} s)")

    t = _stage("θ0: the original model on all of S")
    theta0 = out / "theta0.safetensors"
    model0 = train_model(request.model, data, request.recipe, seed)
    save_model(theta0, model0.state_dict(), model_meta(data, request.model, request.recipe, seed))

    requests_dir = out / "requests"
    shutil.rmtree(requests_dir, ignore_errors=True)
    _reset_ledger(store_url)
    rng = np.random.default_rng(seed)
    forget = rng.choice(data.n_train, 2 * forget_per_request, replace=False)
    model_path = theta0
    for i, ids in enumerate(np.split(forget, 2), start=1):
        t = _stage(f"request {i}: forget {len(ids)} random training ids with DMM")
        path = requests_dir / f"theta_dmm_{i}.safetensors"
        print(unlearn_request(store_url, model_path, ids, method="dmm", out=path).message)
        model_path = path

    t = _stage(f"oracle: retrain from scratch without the {len(forget)} ids")
    keep = np.ones(data.n_train, dtype=bool)
    keep[forget] = False
    retrained = model_logits(train_model(request.model, data, request.recipe, seed, keep), data.all_inputs())
    print(f"retrained in {time.perf_counter() - t:.1f} s")

    forget = np.sort(forget)
    x = data.all_inputs()
    print(f"\n{'model':<12} {'forget':>8} {'retain':>8} {'held-out':>9} {'MSE to retrain':>16}  "
          f"(accuracy; mean squared logit distance on F)")
    print(_row("θ0", model_logits(model0, x), data, forget, retrained))
    print(_row("θ_DMM", model_logits(load_model(model_path, data)[0], x), data, forget, retrained))
    print(_row("retrained", retrained, data, forget, retrained))

    t = _stage(f"KLoM: did DMM forget? {KLOM_MODELS} originals, {KLOM_MODELS} oracles and {KLOM_MODELS} more "
               "retrained models (the floor)")
    print("\n".join(_klom_lines(store_url, forget, out)) + f"\n({time.perf_counter() - t:.0f} s; "
          f"`make evaluate` runs the full comparison with N = 100)")
    print(f"\ndemo done in {time.perf_counter() - start:.0f} s; store, models and ledger in {out}/")


def _klom_lines(store_url: str, forget: np.ndarray, out: Path) -> list[str]:
    """KLoM p95 per group of θ0 (nothing), DMM and retraining (the floor) on the demo's forget set."""
    from .eval_spec import spec_from_dict
    from .evaluate import run_evaluation

    ids = out / "forget_ids.txt"
    ids.write_text(" ".join(map(str, forget)))
    spec = spec_from_dict({"dataset": DEFAULT_DATASET, "models": KLOM_MODELS, "attribution": {"store": store_url},
                           "forget_sets": [f"ids:{ids}"], "methods": {"nothing": {}, "dmm": {}},
                           "metrics": {"relearn_models": 0, "mia_models": 0}})
    rows = {r["method"]: r for r in run_evaluation(spec, out / "klom", progress=False)["rows"]}
    lines = [f"{'population':<26} {'forget':>8} {'retain':>8} {'held-out':>9}  (KLoM 95th pct vs the oracles; "
             "lower is better)"]
    for method, name in (("nothing", "θ0 (nothing)"), ("dmm", "DMM, one request each"),
                         ("retrain", "retrain (the floor)")):
        r = rows[method]
        lines.append(f"{name:<26} {r['klom95_forget']:>8.2f} {r['klom95_retain']:>8.2f} {r['klom95_heldout']:>9.2f}")
    return lines


def _reset_ledger(store_url: str) -> None:
    """Start the demo's request chain afresh (the ledger is append-only for real stores)."""
    from attribution.store import AttributionStore

    store = AttributionStore.open(store_url, "r+")
    if store.has(LEDGER):
        shutil.rmtree(Path(store_url) / "ledger")


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded default: estimate, fit, two DMM requests, report")
    p.add_argument("--out", default="demo_out", help="folder for the store, the models and the ledger")
    p.add_argument("--num-models", type=int, default=2048, help="subset models to estimate")
    p.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=lambda args: run_demo(args.out, args.num_models, address=args.address))
