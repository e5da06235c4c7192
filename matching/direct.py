"""DM-Direct (DESIGN.md §1.2): predicted oracle outputs h(x) = f_x(θ0) − Σ_{i∈F} β_{i,x,:}, calibrated:

h(x) = f_x(θ0) − c_cross·Σ_{i∈F} β_{i,x,:} − (c_self − c_cross)·β_{x,x,:}·[x ∈ F] − |F|·γ'_{x,:} with the fit group's
deletion scales and size effect (`dmm calibrate`, attribution/deletion_scale.py); c_self = c_cross = 1 and γ' = 0
where it was never calibrated. A class F holds whole (S_c ⊆ F) leaves the sum: its measured shift Δ_c(x) is added
instead, where the calibration trained class models (attribution/class_removal.py).

Only the weight rows β_{i,·,·} of i ∈ F are read from the store. The result serves as the
DMM targets and, on its own, as the "DM-Direct" predictor (no weights change, outputs corrected).

A fit for a target subset T (`dmm fit --targets`) predicts h(x) for x ∈ T only: the convention is one
row per point all the same, NaN in the rows of the points not fitted.
"""
from __future__ import annotations

import numpy as np

from attribution.class_removal import classes_held_whole
from attribution.evaluation import model_logits
from attribution.fit_group import fit_group_attrs
from attribution.store import FIT_PREFIXES, AttributionStore, FitGroup

from .errors import MatchingError
from .inputs import forget_set, load_store_model, store_dataset


FIT_COMMAND = {"datamodels": "fit", "trak": "trak"}  # the command that fits each attribution group


def fitted_group(store: AttributionStore, attribution: str, every_target: bool = False) -> FitGroup:
    """The complete `datamodels/` or `trak/` group of the store; a one-line error otherwise, or if
    ``every_target`` (a caller that needs h(x) for every point, e.g. `dmm evaluate`) and it fits a target subset."""
    if attribution not in FIT_PREFIXES:
        raise MatchingError(f"unknown attribution {attribution!r}; choose one of {', '.join(FIT_PREFIXES)}")
    attrs = fit_group_attrs(store, attribution)
    if attrs is None:
        raise MatchingError(f"store {store.url} has no fitted {attribution}; run the {attribution} fit stage first "
                            "or choose the other --attribution")
    fit = FitGroup(store, attribution, attrs)
    if not fit.is_complete():
        raise MatchingError(f"store {store.url} has {len(fit.completed_chunks())}/{fit.num_chunks} {attribution} "
                            "target chunks fitted; finish the fit stage first")
    if every_target and fit.targets.is_subset:
        raise MatchingError(f"store {store.url} has {attribution} for {fit.num_targets} of {store.spec.n_points} "
                            f"points only (--targets {fit.targets.spec}), this needs every point; fix: fit it with "
                            f"`dmm {FIT_COMMAND[attribution]} --targets all`")
    return fit


def whole_classes(fit: FitGroup, forget_ids) -> list[int]:
    """The classes F holds whole that the fit group has a measured shift for (none without class models)."""
    labels = fit.class_labels
    return [] if labels is None else classes_held_whole(labels, forget_ids)


def forget_effect(fit: FitGroup, forget_ids: np.ndarray) -> np.ndarray:
    """f_x(θ0) − h(x) for every fitted point x (train then held-out): float64 (|T|, k), i.e. − Σ_c Δ_c(x) over the
    classes F holds whole (`whole_classes`) plus, over the rest F' of F, c_cross·Σ_{i∈F'} β_{i,x} +
    (c_self − c_cross)·β_{x,x}·[x ∈ F'] + |F'|·γ'_x (attribution/deletion_scale.py)."""
    forget_ids = np.asarray(forget_ids, dtype=np.int64)
    whole = whole_classes(fit, forget_ids)
    if not whole:
        return linear_forget_effect(fit, forget_ids)
    removal = fit.class_removal
    rest = forget_ids[~np.isin(removal.labels[forget_ids], whole)]
    linear = linear_forget_effect(fit, rest) if len(rest) else 0.0
    return linear - removal.effect(whole)


def linear_forget_effect(fit: FitGroup, forget_ids: np.ndarray) -> np.ndarray:
    """c_cross·Σ_{i∈F} β_{i,x} + (c_self − c_cross)·β_{x,x}·[x ∈ F] + |F|·γ'_x: the datamodels' effect of F, scaled."""
    c_self, c_cross = fit.deletion_scales
    total, own = fit.sum_and_own_rows(forget_ids)
    effect = c_cross * total
    columns = fit.target_columns(forget_ids)
    fitted = columns >= 0
    effect[columns[fitted]] += (c_self - c_cross) * own[fitted]
    size = fit.size_effect
    if size is not None:
        effect += len(forget_ids) / fit.store.spec.n_train * size
    return effect


def dm_direct_targets(store: AttributionStore, forget_ids, attribution: str = "datamodels",
                      original_logits: np.ndarray | None = None) -> np.ndarray:
    """h(x) for every point (float32, n_points × k; NaN rows where x is not fitted); θ0's logits default to the ones
    kept in the store."""
    return fit_targets(fitted_group(store, attribution), forget_ids, original_logits)


def fit_targets(fit: FitGroup, forget_ids, original_logits: np.ndarray | None = None) -> np.ndarray:
    """`dm_direct_targets` from a fit group already opened (`fitted_group`)."""
    store = fit.store
    if original_logits is None:
        original_logits = store.read_original_logits()
        if original_logits is None:
            raise MatchingError(f"store {store.url} keeps no θ0 logits yet; pass θ0 (--model) or make a first "
                                "`dmm unlearn` request, which stores them")
    original_logits = np.asarray(original_logits)
    expected = (store.spec.n_points, store.spec.num_classes)
    if original_logits.shape != expected:
        raise MatchingError(f"θ0 logits have shape {original_logits.shape}, the store expects {expected}; "
                            "evaluate θ0 on train then held-out points")
    effect = forget_effect(fit, forget_ids)
    if not fit.targets.is_subset:
        return (original_logits - effect).astype(np.float32)
    h = np.full(expected, np.nan, dtype=np.float32)
    h[fit.targets.ids] = original_logits[fit.targets.ids] - effect
    return h


def dm_direct_prediction(store_url: str, forget_ids, model_path=None, attribution: str = "datamodels",
                         trust_code: bool = False) -> np.ndarray:
    """The "DM-Direct" method as a predictor: h(x) for every point (NaN rows: not fitted), nothing written.

    f(θ0) is the model at `model_path` (checked against the store; a `module:callable` model it names is
    imported only with `trust_code`) or, without one, θ0's logits the store keeps from its first deletion
    request; `forget_ids` is an id file or a sequence of ints.
    """
    store = AttributionStore.open(store_url, mode="r")
    ids = forget_set(forget_ids, store)
    original = None
    if model_path is not None:
        data = store_dataset(store)
        model, _ = load_store_model(model_path, store, data, trust_code=trust_code)
        original = model_logits(model, data.all_inputs()).numpy()
    return dm_direct_targets(store, ids, attribution, original)


SPREAD_STREAM = 1  # z_x's stream of the request's seed (R's draw is the seed's own)


def spread_scale(requested: float | None, fit: FitGroup) -> float:
    """The spread a a DMM request uses: as requested, or by default (None) 1 where the fit group has s_x, else 0."""
    if requested is not None:
        return float(requested)
    return 1.0 if fit.has_forget_spread else 0.0


def with_forget_spread(targets: np.ndarray, fit: FitGroup, forget_ids, labels: np.ndarray, scale: float,
                       seed: int) -> np.ndarray:
    """h with a·s_x·z_x added to the true-class logit of every x ∈ F, z_x ~ N(0, 1) drawn from `seed`
    (attribution/forget_spread.py): a draw of the retrained models' margins around DM-Direct's mean. On a class F
    holds whole s_x is that class's measured s^c_x and z_x one draw for the class (`ClassRemoval.forget_draw`)."""
    spread = fit.forget_spread
    if spread is None:
        raise MatchingError(f"spread {scale}: {fit.prefix}/ of {fit.store.url} has no forget spread (calibrated before "
                            f"it existed, or never); fix: rerun `dmm calibrate --store {fit.store.url} --attribution "
                            f"{fit.prefix}`, or use spread 0")
    forget_ids = np.asarray(forget_ids, dtype=np.int64)
    rng = np.random.default_rng([seed, SPREAD_STREAM])
    spread, z = spread[forget_ids], rng.standard_normal(len(forget_ids))
    whole = whole_classes(fit, forget_ids)
    if whole:
        spread, z = fit.class_removal.forget_draw(forget_ids, whole, spread, z, rng)
    out = np.array(targets, copy=True)
    out[forget_ids, labels[forget_ids]] += (scale * spread * z).astype(out.dtype)
    return out
