"""Unlearning methods: one interface (model, data, F → model), one registry.

A method receives an `UnlearnTask` and returns `Unlearned` (the model and its run's stats); it must not write anything
(the request writes the model and the ledger once the method has returned). DMM and OM are here;
the baselines (DESIGN.md §5, `matching.baselines`) register themselves the same way: written once over a
stack of N models, each is in `STACKED_METHODS` too, which the evaluation runs on all N originals at once.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from attribution.class_removal import classes_held_whole
from attribution.datasets import Dataset
from attribution.evaluation import model_logits
from attribution.models import matching_blocks
from attribution.recipes import Recipe
from attribution.sisa import SisaEnsemble
from attribution.store import AttributionStore

from .direct import FIT_COMMAND, fit_targets, fitted_group, spread_scale, whole_classes, with_forget_spread
from .errors import MatchingError
from .finetune import MatchingConfig, match_logits, matching_points, retain_cap
from .inputs import load_store_model


@dataclass(frozen=True)
class UnlearnTask:
    """What a method may use. `forget_ids` is F: every id forgotten so far, this request's included."""
    model: nn.Module              # the model to edit (θ0 for the first request, else the latest output)
    data: Dataset
    forget_ids: np.ndarray
    store: AttributionStore | None  # the attribution store (None for methods that need no datamodels)
    original_logits: np.ndarray   # f(θ0) on every point (train then held-out), n_points × k
    attribution: str = "datamodels"
    config: MatchingConfig = field(default_factory=MatchingConfig)
    oracles: tuple[str, ...] = ()  # model files trained on S∖F (OM only)
    oracle_mean_logits: np.ndarray | None = None  # OM's targets given directly (n_points × k), e.g. by evaluation
    trust_code: bool = False      # consent to import a module:callable model that the oracle files name
    model_name: str | None = None  # how `model` was built and trained (retrain); default: the store's
    recipe: Recipe | None = None
    model_path: str | None = None  # the file `model` was read from (amnesiac's update record sits beside it)


@dataclass(frozen=True)
class Unlearned:
    """A method's result: the unlearned model and what the method reports of its run (recorded in the ledger),
    e.g. DMM's `MatchingStats`: loss_start, loss_end, steps, epochs, sample_grads."""
    model: nn.Module
    stats: dict = field(default_factory=dict)


UnlearnMethod = Callable[[UnlearnTask], Unlearned]
METHODS: dict[str, UnlearnMethod] = {}
METHOD_CONFIGS: dict[str, type] = {}  # name -> hyperparameter dataclass (defaults, validation)
METHOD_NEEDS: dict[str, frozenset[str]] = {}  # name -> inputs beyond (model, data, F): "store", "oracles"
STACKED_METHODS: dict[str, Callable] = {}  # name -> the method over N stacked models (`matching.baselines.stack`)


def register_method(name: str, config: type = MatchingConfig,
                    needs: tuple[str, ...] = ()) -> Callable[[UnlearnMethod], UnlearnMethod]:
    def add(method: UnlearnMethod) -> UnlearnMethod:
        METHODS[name] = method
        METHOD_CONFIGS[name] = config
        METHOD_NEEDS[name] = frozenset(needs)
        return method
    return add


def get_method(name: str) -> UnlearnMethod:
    if name not in METHODS:
        raise MatchingError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_model_for(method: str, model: nn.Module, path) -> None:
    """A SISA ensemble is unlearned by `sisa` only: any other method would train its stored slice checkpoints."""
    if isinstance(model, SisaEnsemble) and method != "sisa":
        raise MatchingError(f"model {path} is a SISA ensemble (`dmm train --sisa`); unlearn it with --method sisa")


def unlearned_meta(meta: dict, unlearned: dict) -> dict:
    """The sidecar of a method's output: the input's, plus `unlearned`, minus the input's update record
    (`dmm train --record-updates`), which describes how the input was trained, not the output."""
    return {**{k: v for k, v in meta.items() if k != "update_record"}, "unlearned": unlearned}


def match_on_forget_and_retain(task: UnlearnTask, targets: np.ndarray, whole: list[int]) -> Unlearned:
    """Fine-tune task.model towards `targets` (n_points × k) on F ∪ R; `whole` are the classes F deletes whole, whose
    shift the targets hold (`retain_cap`: a model may take more of R on them).

    Where `targets` are known only for some points T (DM-Direct's NaN rows: a fit for a target subset), F ∪ R is
    drawn from T only (`matching_points`) and the stats record `forget_fitted` = |F ∩ T|; with none of F in T the
    request runs on R, with a warning. Read from `targets` itself, so a request reads no more metadata.
    """
    known = ~np.isnan(targets).any(axis=1)
    fitted = None if known.all() else np.flatnonzero(known)
    model_name = task.model_name or (task.store.spec.model if task.store else None)
    cap = retain_cap(task.config.max_retain, model_name, bool(whole))
    points = matching_points(task.forget_ids, task.data.n_train, task.config.retain_ratio, task.config.seed, fitted,
                             cap)
    extra = {}
    if fitted is not None:
        extra["forget_fitted"] = int(np.isin(task.forget_ids, fitted).sum())
        if len(points) == 0:
            raise MatchingError(f"no fitted train point to match on ({task.attribution}/ fits {len(fitted)} targets, "
                                f"none of F and no retain point); fix: refit with `dmm {FIT_COMMAND[task.attribution]} "
                                "--targets ids:FILE` listing train points")
        if extra["forget_fitted"] == 0:
            warnings.warn(f"0 of the {len(task.forget_ids)} forget ids are fitted targets of {task.attribution}/ "
                          f"({len(fitted)} targets): matching on {len(points)} retain points only; fix: refit with "
                          f"`dmm {FIT_COMMAND[task.attribution]} --targets ids:FILE` listing them", stacklevel=2)
    config = task.config
    if config.train_blocks is None:  # the model's default: the task's model, else the store's
        config = replace(config, train_blocks=matching_blocks(model_name))
    model, stats = match_logits(task.model, task.data.x_train[points], torch.from_numpy(targets[points]), config)
    return Unlearned(model, {**stats.to_dict(), **extra, "train_blocks": config.train_blocks, "max_retain": cap})


@register_method("dmm", needs=("store",))
def datamodel_matching(task: UnlearnTask) -> Unlearned:
    """DMM: match DM-Direct's h(x) = f_x(θ0) − Σ_{i∈F} β_{i,x,:} (calibrated: `matching.direct`), on F a draw around it
    with spread a > 0 (`with_forget_spread`; by default a = 1 where the store has s_x). The stats record a and the
    classes F holds whole, whose measured shift replaced the datamodels' sum (attribution/class_removal.py)."""
    if task.oracles:
        raise MatchingError("--oracles is for --method om; drop it for dmm")
    if task.store is None:
        raise MatchingError("dmm needs an attribution store with fitted datamodels; pass --store")
    fit = fitted_group(task.store, task.attribution)
    targets = fit_targets(fit, task.forget_ids, task.original_logits)
    whole = whole_classes(fit, task.forget_ids)
    spread = spread_scale(task.config.spread, fit)
    if spread:
        targets = with_forget_spread(targets, fit, task.forget_ids, task.data.y_train.numpy(), spread, task.config.seed)
    matched = match_on_forget_and_retain(task, targets, whole)
    return Unlearned(matched.model, {**matched.stats, "spread": spread, "whole_classes": whole})


def oracle_logits(task: UnlearnTask) -> np.ndarray:
    """Mean logits of the oracles (n_points × k), each checked against the store and trained without F."""
    if task.oracle_mean_logits is not None:
        return np.asarray(task.oracle_mean_logits, dtype=np.float32)
    if not task.oracles:
        raise MatchingError("--method om needs --oracles: model files trained on S∖F")
    logits = []
    for path in task.oracles:
        model, meta = load_store_model(path, task.store, task.data, trust_code=task.trust_code)
        excluded = np.asarray(meta.get("excluded", []), dtype=np.int64)
        if not np.array_equal(np.sort(excluded), task.forget_ids):
            raise MatchingError(f"oracle {Path(path)} was trained without {len(excluded)} ids, not the "
                                f"{len(task.forget_ids)} ids of F; train oracles with `dmm train --exclude` on F")
        logits.append(model_logits(model, task.data.all_inputs()).numpy())
    return np.mean(logits, axis=0)


@register_method("om", needs=("oracles",))
def oracle_matching(task: UnlearnTask) -> Unlearned:
    """OM: match the mean logits of real oracles (the ablation with exact targets)."""
    if task.config.spread:
        raise MatchingError(f"spread {task.config.spread} is DMM's (a draw around DM-Direct's mean); use 0 with om")
    return match_on_forget_and_retain(task, oracle_logits(task),
                                      classes_held_whole(task.data.y_train.numpy(), task.forget_ids))


from . import baselines  # noqa: E402,F401 - registers the baselines (imports this module's registry)
