"""The stage functions of `dmm evaluate` (DESIGN.md §3), each `fn(config, out, inputs)`.

- `attribution`: the store whose β DM-Direct and DMM use: reused, or estimated and fitted into it.
- `calibration`: the deletion scales of that β (`dmm calibrate`), computed unless the store has them for
  the same settings; M = 0 keeps the store's as they are.
- `forget`: F's training ids (`matching.forget_sets`).
- `population`: N models trained with the store's model and recipe, each on S (the originals) or on
  S∖F (the oracles, and the independent second oracle set whose KLoM is the floor), trained together
  with the model-batched engine. Writes logits (N × P × k), the stacked states and the time per model;
  the floor also times one retrain with the one-model trainer (the cost unit of the report).
- `records`: the originals of a training-time method (`amnesiac`, `sisa`), trained its way with the same
  seeds, one model file each with its records beside it (`eval_methods.train_originals`); logits and
  time per model as `population`, plus the bytes per model (file, sidecar and records).
- `method`: one method applied to each of the N originals (`eval_methods.apply_method`).
- `metrics`: KLoM per point and per group against the oracles, accuracy, MIA, U-LiRA, relearn time,
  weight distance from the originals, cost.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from attribution.datasets import Dataset, check_fingerprint, load_dataset
from attribution.engine import train_batched, train_model
from attribution.evaluation import margins
from attribution.fit_group import DELETION_SCALE, fit_group_attrs, recorded_settings
from attribution.lds import default_holdout
from attribution.recipes import Recipe
from attribution.store import AttributionStore
from matching.direct import fitted_group
from matching.errors import MatchingError
from matching.forget_sets import resolve_forget_set
from matching.klom import DIRECTIONS, klom, klom_summary, spread_ratio
from matching.layer_distance import TOTAL, layer_distances
from matching.mia import ULIRA_MIN_MODELS, mia_entropy, mia_svc, ulira_auc
from matching.relearn import relearn_steps

from .eval_methods import apply_method, load_model_from_state, train_originals


def _data(config: dict) -> Dataset:
    torch.set_num_threads(1)
    data = load_dataset(config["dataset"])
    check_fingerprint(data, config["fingerprint"], "the experiment")
    return data


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def _save_states(path: Path, states: dict[str, torch.Tensor] | None) -> None:
    if states is not None:
        save_file({k: v.detach().contiguous() for k, v in states.items()}, str(path))


def load_states(directory: Path) -> dict[str, torch.Tensor] | None:
    path = Path(directory) / "states.safetensors"
    return load_file(str(path)) if path.is_file() else None


def _store(inputs: dict) -> AttributionStore:
    return AttributionStore.open(read_json(inputs["attribution"] / "store.json")["url"], "r")


def attribution_stage(config: dict, out: Path, inputs: dict) -> None:
    """Reuse the store at config["url"], or estimate and fit it there first (both resumable)."""
    from .estimate import EstimateRequest, run_estimate
    from .fit import fit_store, resume_config

    url, source = config["url"], config["source"]
    if config.get("num_models") is not None:
        request = EstimateRequest(config["dataset"], config["model"], Recipe.from_dict(config["recipe"]),
                                  alpha=config["alpha"], seed=config["seed"], block_size=config["block_size"])
        run_estimate(request, url, config["num_models"], progress=False)
        if source == "trak":
            from attribution.trak import TrakSettings, run_trak
            store = AttributionStore.open(url, "r+")
            kept = fit_group_attrs(store, "trak")  # resumed with its own H; a new group's suits the store's size
            holdout = recorded_settings(kept)["holdout_models"] if kept else default_holdout(store.completed_models())
            run_trak(store, TrakSettings(holdout_models=holdout))
        else:
            fit_store(url, resume_config(url))
    fitted_group(AttributionStore.open(url, "r"), source, every_target=True)  # one-line error: incomplete, or a subset
    _write_json(out / "store.json", {"url": url, "source": source})


def calibration_is_current(have: dict, config: dict) -> bool:
    """Whether the store's `deletion_scale` record is the one the stage asks for: the same M, α', K and K_c, with the
    forget spread and scales fitted on margins (a store calibrated before either is recalibrated)."""
    return ((have.get("models"), have.get("alpha"), have.get("full_models", 0), have.get("class_models", 0))
            == (config["models"], config["alpha"], config["full_models"], config["class_models"])
            and "spread_gamma" in have and have.get("fitted_on") == config["fitted_on"])


def calibration_stage(config: dict, out: Path, inputs: dict) -> None:
    """Give the store's β the deletion scales of M models on α'-subsets, the size effect of K models on all of S, the
    forget spread and the whole-class term of K_c models per class (kept if it has them all); record them."""
    from .commands_calibrate import calibrate_store

    fit = fitted_group(_store(inputs), config["source"])
    have = fit.attrs.get(DELETION_SCALE, {})
    if config["models"] and not calibration_is_current(have, config):
        have = calibrate_store(fit.store.url, config["source"], config["models"], config["alpha"],
                               trust_code=True,  # the spec had consent for the store's model (experiment_stages)
                               full_models=config["full_models"], class_models=config["class_models"]).to_attrs()
    _write_json(out / "calibration.json", {"scale_self": have.get("scale_self", 1.0),
                                           "scale_cross": have.get("scale_cross", 1.0),
                                           "full_models": have.get("full_models", 0)})


def forget_stage(config: dict, out: Path, inputs: dict) -> None:
    data = _data(config)
    fit = fitted_group(_store(inputs), config["source"]) if "attribution" in inputs else None
    np.save(out / "ids.npy", resolve_forget_set(config["spec"], data, fit))


def population_stage(config: dict, out: Path, inputs: dict) -> None:
    data = _data(config)
    recipe = Recipe.from_dict(config["recipe"])
    masks = np.ones((len(config["seeds"]), data.n_train), dtype=bool)
    if "forget" in inputs:
        masks[:, np.load(inputs["forget"] / "ids.npy")] = False
    start = time.perf_counter()
    result = train_batched(config["model"], data, recipe, config["seeds"], masks)
    timing = {"seconds_per_model": (time.perf_counter() - start) / len(config["seeds"]),
              "sample_grads_per_model": float(recipe.epochs * masks.sum(axis=1).mean())}
    if config.get("time_one_retrain"):
        start = time.perf_counter()
        train_model(config["model"], data, recipe, config["seeds"][0], masks[0])
        timing["retrain_one_s"] = time.perf_counter() - start
    np.save(out / "logits.npy", result.logits.numpy().astype(np.float32))
    _save_states(out / "states.safetensors", result.state)
    _write_json(out / "timing.json", timing)


def records_stage(config: dict, out: Path, inputs: dict) -> None:
    data = _data(config)
    start = time.perf_counter()
    logits, states = train_originals(config["method"], config["training"], config["model"], data,
                                     Recipe.from_dict(config["recipe"]), config["seeds"], out)
    n = len(config["seeds"])
    timing = {"seconds_per_model": (time.perf_counter() - start) / n,
              "bytes_per_model": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / n}
    np.save(out / "logits.npy", logits)
    _save_states(out / "states.safetensors", states)
    _write_json(out / "timing.json", timing)


def method_stage(config: dict, out: Path, inputs: dict) -> None:
    data = _data(config)
    oracle_mean = np.load(inputs["floor"] / "logits.npy").mean(axis=0) if "floor" in inputs else None
    logits, states, seconds, stats = apply_method(
        config["method"], config["params"], config["model"], data, load_states(inputs["originals"]),
        np.load(inputs["originals"] / "logits.npy"), np.load(inputs["forget"] / "ids.npy"),
        store=_store(inputs) if "attribution" in inputs else None, attribution=config["source"],
        oracle_mean_logits=oracle_mean, model_files=sorted(inputs["originals"].glob("model-*.safetensors")) or None)
    np.save(out / "logits.npy", logits)
    _save_states(out / "states.safetensors", states)
    _write_json(out / "timing.json", {**mean_stats(stats), "seconds_per_model": float(np.mean(seconds)),
                                      "seconds": seconds.tolist()})


def mean_stats(stats: list[dict]) -> dict:
    """Per-model means of the numeric stats methods report (steps, sample_grads, loss_start, loss_end, seconds
    of fine-tuning: the stage's own wall-time entries take precedence)."""
    keys = [k for k in stats[0] if all(isinstance(s.get(k), (int, float)) for s in stats)]
    return {f"{k}_per_model" if k == "sample_grads" else k: float(np.mean([s[k] for s in stats])) for k in keys}


def groups_of(forget: np.ndarray, n_train: int, n_points: int) -> dict[str, np.ndarray]:
    """Point indices of the three KLoM groups: forget F, retain S∖F, held-out."""
    return {"forget": forget, "retain": np.setdiff1d(np.arange(n_train), forget),
            "heldout": np.arange(n_train, n_points)}


def _accuracies(logits: np.ndarray, labels: np.ndarray, groups: dict) -> dict[str, float]:
    correct = logits.argmax(-1) == labels  # (N, P)
    return {name: float(correct[:, idx].mean()) for name, idx in groups.items()}


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _relearn(config: dict, data: Dataset, states, original_logits: np.ndarray, forget: np.ndarray) -> dict:
    m = config["metrics"]
    count = min(m["relearn_models"], original_logits.shape[0])
    if states is None or count == 0:
        return {"relearn_steps": None, "relearn_never": None}
    labels = data.y_train[forget]
    steps = []
    for i in range(count):
        model = load_model_from_state(config["model"], data, {k: v[i] for k, v in states.items()})
        target = float((original_logits[i, forget].argmax(-1) == labels.numpy()).mean())
        steps.append(relearn_steps(model, data.x_train[forget], labels, target, lr=m["relearn_lr"],
                                   batch_size=m["relearn_batch_size"], max_steps=m["relearn_max_steps"], seed=i))
    steps = np.asarray(steps)
    return {"relearn_steps": float(np.mean(steps)), "relearn_never": int((steps > m["relearn_max_steps"]).sum())}


def _distances(states, original_states) -> dict:
    if states is None:
        return {"weight_distance": None, "layer_distance": None}
    per_model = [layer_distances({k: v[i] for k, v in states.items()}, {k: v[i] for k, v in original_states.items()})
                 for i in range(next(iter(states.values())).shape[0])]
    mean = {name: float(np.mean([d[name] for d in per_model])) for name in per_model[0]}
    return {"weight_distance": mean[TOTAL], "layer_distance": mean}


def _kept_states(states, kept: np.ndarray):
    return None if states is None else {k: v[torch.from_numpy(kept)] for k, v in states.items()}


def metrics_stage(config: dict, out: Path, inputs: dict) -> None:
    """KLoM of the population against the oracles and the literature's other metrics (issue 12 §3–4).

    Models whose logits are not finite (a method that diverged) are left out of every metric and counted
    (`diverged`); every model diverged is an error naming the method."""
    data = _data(config)
    m = config["metrics"]
    labels = data.all_labels().numpy()
    forget = np.load(inputs["forget"] / "ids.npy")
    groups = groups_of(forget, data.n_train, data.n_points)
    logits = np.load(inputs["population"] / "logits.npy")
    kept = np.isfinite(logits).all(axis=(1, 2))  # a model whose logits are not finite diverged: counted, not measured
    if not kept.any():
        raise MatchingError(f"{config['method']}: all {len(kept)} models diverged (non-finite logits); lower its lr "
                            "or drop it from the spec")
    logits = logits[kept]
    oracle_logits = np.load(inputs["oracles"] / "logits.npy")
    original_logits = np.load(inputs["originals"] / "logits.npy")[kept]
    pop_margins = margins(torch.from_numpy(logits), torch.from_numpy(labels)).numpy().astype(np.float32)
    oracle_margins = margins(torch.from_numpy(oracle_logits), torch.from_numpy(labels)).numpy()
    values = klom(oracle_margins, pop_margins, direction=m["klom_direction"])
    other = next(d for d in DIRECTIONS if d != m["klom_direction"])  # beside it: spread lowers one, raises the other
    acc, acc_oracle = _accuracies(logits, labels, groups), _accuracies(oracle_logits, labels, groups)
    mia_models = range(min(m["mia_models"], logits.shape[0]))
    states = _kept_states(load_states(inputs["population"]), kept)
    timing = read_json(inputs["population"] / "timing.json")
    floor_timing = read_json(inputs["floor"] / "timing.json")
    retrain_s, retrain_grads = floor_timing["retrain_one_s"], floor_timing["sample_grads_per_model"]
    seconds = retrain_s if config["method"] == "retrain" else timing["seconds_per_model"]
    grads = timing.get("sample_grads_per_model", 0.0)
    result = {
        "method": config["method"], "klom_direction": m["klom_direction"], "diverged": int((~kept).sum()),
        "klom": klom_summary(values, groups),
        "klom_other": klom_summary(klom(oracle_margins, pop_margins, direction=other), groups),
        "spread": {g: spread_ratio(oracle_margins[:, idx], pop_margins[:, idx]) for g, idx in groups.items()},
        "accuracy": acc, "accuracy_oracle": acc_oracle,
        "accuracy_gap": {g: acc[g] - acc_oracle[g] for g in groups},
        "mia_svc": _mean_or_none([mia_svc(logits[i], labels, groups, seed=i) for i in mia_models]),
        "mia_entropy": _mean_or_none([mia_entropy(logits[i], labels, groups, seed=i) for i in mia_models]),
        "ulira_auc": ulira_auc(pop_margins[:, forget], oracle_margins[:, forget], seed=config["seed"])
        if len(pop_margins) >= ULIRA_MIN_MODELS else None,  # too few models left after divergence
        **_relearn(config, data, states, original_logits, forget),
        **_distances(states, _kept_states(load_states(inputs["originals"]), kept)),
        "seconds": seconds, "retrain_seconds": retrain_s, "cost_vs_retrain": seconds / retrain_s,
        "sample_grads": grads, "grads_vs_retrain": grads / retrain_grads,
        "matching": {k: timing[k] for k in ("loss_start", "loss_end", "steps") if k in timing} or None,
    }
    np.save(out / "klom.npy", values.astype(np.float32))
    np.save(out / "margins.npy", pop_margins)
    _write_json(out / "metrics.json", result)


STAGE_FUNCTIONS = {"attribution": attribution_stage, "calibration": calibration_stage, "forget": forget_stage,
                   "population": population_stage, "records": records_stage, "method": method_stage,
                   "metrics": metrics_stage}
