"""The methods `dmm evaluate` compares, and how one is applied to the N original models.

Every method of the registry (`matching.methods`) runs on each original θ_n with F and its
hyperparameters. Three populations are not registry edits of a model:

- `nothing`   the originals θ_n themselves (what an unlearning method must move away from);
- `retrain`   N fresh models trained on S∖F with their own seeds: the second, independent oracle set,
              whose KLoM against the oracles is the noise floor (DESIGN.md §2);
- `dm-direct` DM-Direct's predicted outputs h_n(x) = f_x(θ_n) − Σ_{i∈F} β_{i,x,:}, with the store's deletion
              scales (`matching.direct`; no model).

A method written over stacked models (`matching.methods.STACKED_METHODS`) runs on all N originals in one
vectorised pass; the others (and models with BatchNorm) run one model at a time.

A training-time method (needs "training records": `amnesiac`, `sisa`) unlearns originals trained its
way, with the seeds of the plain originals (`train_originals`): `amnesiac` N models trained one at a
time with an update record (`train_model`, which differs from the stacked trainer by ~1e-6, so they are
a population of their own), `sisa` N SISA ensembles of `shards` × `slices`. Their training is not part
of the method's cost, as in the papers; KLoM is against the same oracles as every other method.
"""
from __future__ import annotations

import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch

from attribution.checkpoint import load_model, model_meta, save_model
from attribution.datasets import Dataset
from attribution.engine import has_batchnorm, train_model
from attribution.errors import DmmError
from attribution.evaluation import model_logits
from attribution.models import build_model
from attribution.recipes import Recipe, same_kind_as_default
from attribution.sisa import train_sisa
from attribution.update_record import UpdateRecorder
from matching.baselines.stack import ModelStack, StackedTask
from matching.direct import fitted_group, forget_effect
from matching.methods import METHOD_CONFIGS, METHOD_NEEDS, METHODS, STACKED_METHODS, UnlearnTask

POPULATIONS = ("nothing", "retrain", "dm-direct")  # `retrain` here is the floor population (its own seeds)
EVAL_METHODS = (*POPULATIONS, *sorted(set(METHODS) - set(POPULATIONS)))


class MethodConfigError(DmmError):
    """Hyperparameters a method does not have, or values it cannot take."""


def base_method(name: str) -> str:
    """The method a spec entry runs: `dmm@fast` is a variant of `dmm` (own hyperparameters, own report row)."""
    return name.partition("@")[0]


def method_needs(name: str) -> frozenset[str]:
    """Inputs of method `name` beyond the originals and F: "store" (β), "oracles" (OM's targets)."""
    if name == "dm-direct":
        return frozenset({"store"})
    return METHOD_NEEDS.get(name, frozenset())


def method_config(name: str, params: dict) -> dict:
    """Validated hyperparameters of `name` with its defaults filled in (a JSON-able dict)."""
    if not isinstance(params, dict):
        raise MethodConfigError(f"hyperparameters of {name} must be a mapping of key: value")
    if name in POPULATIONS:
        if params:
            raise MethodConfigError(f"method {name} takes no hyperparameters; give it {{}}")
        return {}
    return hyperparameters(name, params)


def training_time(name: str, params: dict) -> dict | None:
    """The training-time hyperparameters of a method whose originals are trained its way, else None."""
    if "training records" not in method_needs(name):
        return None
    return {k: params[k] for k in METHOD_CONFIGS[name].training_time}


def hyperparameters(name: str, params: dict) -> dict:
    """`params` checked against the config dataclass of registered method `name`, its defaults filled in."""
    cls = METHOD_CONFIGS[name]
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        valid = ", ".join(f"{f.name} (default {f.default!r})" for f in known.values())
        raise MethodConfigError(f"method {name} has no hyperparameter {', '.join(map(repr, unknown))}; valid: {valid}")
    for key, value in params.items():
        default = known[key].default
        if not same_kind_as_default(value, default):
            raise MethodConfigError(f"method {name}: {key} is {value!r}; give a {type(default).__name__} "
                                    f"like the default {default!r} (keys: {', '.join(known)})")
    return asdict(cls(**params))


def load_model_from_state(model_name: str, data: Dataset, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(model_name, data.input_shape, data.num_classes, 0)
    model.load_state_dict(state)
    return model.eval()


def _recorded(model_name: str, data: Dataset, recipe: Recipe, seed: int, path: Path, training: dict):
    """`amnesiac`'s original: one model trained with its update record beside `path` (`dmm train --record-updates`)."""
    recorder = UpdateRecorder(path, training["keep"])
    model = train_model(model_name, data, recipe, seed, recorder=recorder)
    return model, {"update_record": recorder.finish()}


def _ensemble(model_name: str, data: Dataset, recipe: Recipe, seed: int, path: Path, training: dict):
    """`sisa`'s original: a SISA ensemble of shards × slices (`dmm train --sisa S,R`)."""
    model, _ = train_sisa(model_name, data, recipe, seed, training["shards"], training["slices"])
    return model, {"sisa": model.manifest(recipe)}


TRAINERS = {"amnesiac": _recorded, "sisa": _ensemble}


def train_originals(name: str, training: dict, model_name: str, data: Dataset, recipe: Recipe, seeds,
                    out: Path) -> tuple[np.ndarray, dict[str, torch.Tensor] | None]:
    """The originals of training-time method `name`, one per seed, saved as `dmm train` saves them (sidecar,
    records) to `out/model-NNNNN.safetensors`; returns (logits (N, P, k), stacked states or None)."""
    x = data.all_inputs()
    logits, states = [], []
    for n, seed in enumerate(seeds):
        path = out / f"model-{n:05d}.safetensors"
        model, extra = TRAINERS[name](model_name, data, recipe, seed, path, training)
        save_model(path, model.state_dict(), model_meta(data, model_name, recipe, seed, **extra))
        logits.append(model_logits(model, x).numpy())
        states.append(model.state_dict())
    return np.stack(logits).astype(np.float32), _stacked(states, model_name, data)


def _stacked(states: list[dict[str, torch.Tensor]], model_name: str, data: Dataset) -> dict[str, torch.Tensor] | None:
    """The N state dicts stacked (N, …); None when they are not `model_name`'s (a SISA ensemble has no one θ)."""
    keys = build_model(model_name, data.input_shape, data.num_classes, 0).state_dict().keys()
    if set(states[0]) != set(keys):
        return None
    return {k: torch.stack([s[k].detach().clone() for s in states]) for k in keys}


def apply_method(name: str, params: dict, model_name: str, data: Dataset, states: dict[str, torch.Tensor] | None,
                 original_logits: np.ndarray, forget_ids: np.ndarray, store=None, attribution: str = "datamodels",
                 oracle_mean_logits: np.ndarray | None = None, model_files: list[Path] | None = None):
    """Run method `name` on every original (stacked `states`, (N, …), or the files `train_originals` wrote);
    returns (logits (N, P, k) float32, stacked states or None when the method makes no single model, seconds
    per model, the method's stats per model). Request n draws its random choices (R, minibatch order) from
    the method's seed + n."""
    n_models = original_logits.shape[0]
    no_gradients = [{"sample_grads": 0}] * n_models
    if name == "nothing":
        return original_logits, states, np.zeros(n_models), no_gradients
    if name == "dm-direct":
        start = time.perf_counter()
        effect = forget_effect(fitted_group(store, attribution), forget_ids).astype(np.float32)
        seconds = time.perf_counter() - start
        return (original_logits - effect[None]).astype(np.float32), None, np.full(n_models, seconds), no_gradients
    method, config = METHODS[name], METHOD_CONFIGS[name](**params)
    if name in STACKED_METHODS and model_files is None:
        base = build_model(model_name, data.input_shape, data.num_classes, 0)
        if not has_batchnorm(base):
            return _apply_stacked(name, config, base, model_name, data, states, forget_ids)
    x = data.all_inputs()
    logits, new_states, seconds, stats = [], [], [], []
    for n in range(n_models):
        if model_files is None:
            model, file = load_model_from_state(model_name, data, {k: v[n] for k, v in states.items()}), {}
        else:
            model, meta = load_model(model_files[n], data, trust_code=True)  # our stage wrote it; the spec had consent
            file = {"model_path": str(model_files[n]), "recipe": Recipe.from_dict(meta["recipe"])}
        task = UnlearnTask(model=model, data=data, forget_ids=forget_ids, store=store,
                           original_logits=original_logits[n], attribution=attribution,
                           config=replace(config, seed=config.seed + n) if hasattr(config, "seed") else config,
                           oracle_mean_logits=oracle_mean_logits, model_name=model_name, **file)
        start = time.perf_counter()
        unlearned = method(task)
        seconds.append(time.perf_counter() - start)
        logits.append(model_logits(unlearned.model, x).numpy())
        new_states.append(unlearned.model.state_dict())
        stats.append(unlearned.stats)
    return np.stack(logits).astype(np.float32), _stacked(new_states, model_name, data), np.asarray(seconds), stats


def _apply_stacked(name: str, config, base: torch.nn.Module, model_name: str, data: Dataset,
                   states: dict[str, torch.Tensor], forget_ids: np.ndarray):
    """`apply_method` for a stacked method: all N originals in one pass, model n with seed config.seed + n."""
    params = {k: states[k].clone() for k, _ in base.named_parameters()}
    stack = ModelStack(base.to("meta"), params, {k: v.clone() for k, v in states.items() if k not in params})
    n_models = stack.size
    task = StackedTask(stack, data, forget_ids, config, tuple(config.seed + n for n in range(n_models)), model_name)
    start = time.perf_counter()
    result = STACKED_METHODS[name](task)
    seconds = (time.perf_counter() - start) / n_models
    logits = result.stack.logits(data.all_inputs()).cpu().numpy().astype(np.float32)
    stats = [{**result.stats, "seconds": seconds}] * n_models
    return logits, {k: v.detach().clone() for k, v in result.stack.state().items()}, np.full(n_models, seconds), stats
