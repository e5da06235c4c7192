"""DM-Direct (DESIGN.md §1.2): predicted oracle outputs h(x) = f_x(θ0) − Σ_{i∈F} β_{i,x,:}.

Only the weight rows β_{i,·,·} of i ∈ F are read from the store. The result serves as the
DMM targets and, on its own, as the "DM-Direct" predictor (no weights change, outputs corrected).
"""
from __future__ import annotations

import numpy as np

from attribution.store import FIT_PREFIXES, AttributionStore, FitGroup

from .errors import MatchingError

ROW_BATCH = 256  # F rows summed per read, bounding memory at ROW_BATCH × n_points × k


def fitted_group(store: AttributionStore, attribution: str) -> FitGroup:
    """The complete `datamodels/` or `trak/` group of the store; a one-line error otherwise."""
    if attribution not in FIT_PREFIXES:
        raise MatchingError(f"unknown attribution {attribution!r}; choose one of {', '.join(FIT_PREFIXES)}")
    if not store.has_fit_group(attribution):
        raise MatchingError(f"store {store.url} has no fitted {attribution}; run the {attribution} fit stage first "
                            "or choose the other --attribution")
    fit = store.fit_group(attribution)
    if not fit.is_complete():
        raise MatchingError(f"store {store.url} has {len(fit.completed_chunks())}/{fit.num_chunks} {attribution} "
                            "target chunks fitted; finish the fit stage first")
    return fit


def forget_effect(fit: FitGroup, forget_ids: np.ndarray) -> np.ndarray:
    """Σ_{i∈F} β_{i,x,:} for every point x (train then held-out): float64 (n_points, k)."""
    s = fit.store.spec
    total = np.zeros((s.n_points, s.num_classes), dtype=np.float64)
    forget_ids = np.asarray(forget_ids, dtype=np.int64)
    for start in range(0, len(forget_ids), ROW_BATCH):
        total += fit.read_weight_rows(forget_ids[start:start + ROW_BATCH]).sum(axis=0, dtype=np.float64)
    return total


def dm_direct_targets(store: AttributionStore, forget_ids, attribution: str = "datamodels",
                      original_logits: np.ndarray | None = None) -> np.ndarray:
    """h(x) for every point (float32, n_points × k); θ0's logits default to the ones kept in the store."""
    if original_logits is None:
        original_logits = store.read_original_logits()
        if original_logits is None:
            raise MatchingError(f"store {store.url} keeps no θ0 logits yet; pass original_logits or make a first "
                                "`dmm unlearn` request, which stores them")
    original_logits = np.asarray(original_logits)
    expected = (store.spec.n_points, store.spec.num_classes)
    if original_logits.shape != expected:
        raise MatchingError(f"θ0 logits have shape {original_logits.shape}, the store expects {expected}; "
                            "evaluate θ0 on train then held-out points")
    effect = forget_effect(fitted_group(store, attribution), forget_ids)
    return (original_logits - effect).astype(np.float32)
