"""Whole-class deletions: what removing every training point of a class does, measured at calibration.

Every α-subset holds about α of every class, so no datamodel fitted on them sees a model without class c, and
their summed effect Σ_{i∈S_c} β_{i,x} predicts a small part of what removing all of S_c does (digits, all of
class 3: DM-Direct's KLoM95 on F 11.0, θ0's 11.1, the floor's 1.3): with no point left to teach it, the class's
margins fall far outside anything the α-subsets' models showed. That request, the field's "class-wise
forgetting", is answered from models instead: `dmm calibrate` trains K_c models on S ∖ S_c for every class c
(the store's model, recipe and seed; class c's seeds are block `seed_block` + c of the store's seed) beside its K
models on all of S, and keeps

    Δ_c(x) = ȳ_x(S ∖ S_c) − ȳ_x(S)                              (C × |T| × k: the mean logits' shift),
    s^c_x = sqrt(max(Var_{S∖S_c}(m_x) − Var_S(m_x), 0)),  x ∈ S_c  (n_train: the margin's extra sd over seeds),

the variances over the K_c and the K models (ddof 1). DM-Direct then adds Δ_c for every class F holds whole and
predicts the rest of F linearly, as before (matching/direct.py); DMM's spread on F uses s^c_x on those points
in place of s_x, which measures one point's removal. Several whole classes add their shifts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .datasets import Dataset
from .engine import train_batched
from .forget_spread import margins_of
from .recipes import Recipe
from .subsets import block_seeds

CALIBRATION_CLASS_MODELS = 16  # K_c per class (the default of `dmm calibrate` where K >= 2 full-data models train)


@dataclass(frozen=True)
class ClassRemoval:
    """Δ_c and s^c_x (module docstring) with the training labels that define S_c; Δ and s^c are numpy arrays or, as
    a store opens them (`FitGroup.class_removal`), zarr arrays read where indexed."""
    shift: np.ndarray   # Δ (C, |T|, k) float32
    spread: np.ndarray  # s^c_x (n_train,) float32, each point's own class's
    labels: np.ndarray  # y (n_train,) int32

    def effect(self, classes: list[int]) -> np.ndarray:
        """Σ_c Δ_c over `classes`, float64 (|T|, k)."""
        return sum(np.asarray(self.shift[c], dtype=np.float64) for c in classes)

    def forget_draw(self, forget_ids, classes: list[int], spread: np.ndarray, z: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(s_x, z_x) of each x ∈ F for DMM's draw a·s_x·z_x, given the per-point `spread` s_x and draws `z` of F: on
        the points of `classes`, s^c_x and one z_c ~ N(0, 1) per class, drawn from `rng` after z. A retrained model
        moves a removed class's margins together (digits: 56–75 % of their variance over seeds is shared by the
        class's points, README, "Whole-class deletions"), and a shared shift is one a fine-tuning can fit in a few
        steps where independent ones per point are not; each point's margin has the same distribution either way."""
        forget_ids = np.asarray(forget_ids, dtype=np.int64)
        labels = self.labels[forget_ids]
        shared = rng.standard_normal(len(classes))
        whole = np.isin(labels, classes)
        z_class = shared[np.searchsorted(classes, np.where(whole, labels, classes[0]))]
        return (np.where(whole, np.asarray(self.spread[...])[forget_ids], spread),
                np.where(whole, z_class, z))


def classes_held_whole(labels: np.ndarray, forget_ids) -> list[int]:
    """The classes c whose every training point is in F (S_c ⊆ F, S_c non-empty), from the training labels."""
    counts = np.bincount(labels)
    forgotten = np.bincount(labels[np.asarray(forget_ids, dtype=np.int64)], minlength=len(counts))
    return [int(c) for c in np.flatnonzero((counts > 0) & (forgotten == counts))]


def measure_class_removal(spec, data: Dataset, class_models: int, full_logits: np.ndarray, fitted_points: np.ndarray,
                          seed_block: int, device: str = "cpu") -> ClassRemoval:
    """Train K_c ≥ 2 models on S ∖ S_c per class c (all C·K_c at once, stacked; the store spec's model, recipe and
    seed) and measure Δ and s^c against the K ≥ 2 full-data models' logits `full_logits` (K, p, k); Δ on the fitted
    points (`deletion_scale.resolve_class_models` holds both counts to 2 at least)."""
    labels = data.y_train.numpy()
    classes = range(data.num_classes)
    masks = np.repeat(np.stack([labels != c for c in classes]), class_models, axis=0)
    seeds = np.concatenate([block_seeds(spec.seed, seed_block + c, class_models) for c in classes])
    trained = train_batched(spec.model, data, Recipe.from_dict(spec.recipe), seeds, masks, device)
    logits = trained.logits.cpu().numpy().astype(np.float64).reshape(data.num_classes, class_models,
                                                                      *full_logits.shape[1:])
    full_mean = full_logits[:, fitted_points].mean(axis=0)
    shift = logits[:, :, fitted_points].mean(axis=1) - full_mean
    n = data.n_train
    full_variance = margins_of(full_logits[:, :n], labels).var(axis=0, ddof=1)
    spread = np.zeros(n)
    for c in classes:
        members = np.flatnonzero(labels == c)
        extra = margins_of(logits[c][:, members], labels[members]).var(axis=0, ddof=1) - full_variance[members]
        spread[members] = np.sqrt(np.maximum(extra, 0.0))
    return ClassRemoval(shift.astype(np.float32), spread.astype(np.float32), labels.astype(np.int32))
