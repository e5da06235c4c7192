"""Fit the datamodels of one chunk of targets: f_{x,c}(A(S')) ≈ β0_{x,c} + Σ_{i∈S'} β_{i,x,c}.

One L1-regularised regression per (target x, class c) over the subset masks, solved together
(`lasso.fit_datamodels`); λ is picked per regression on validation models taken from the fitting
models, then refitted on all of them; the LDS is measured on H held-out models never used in fitting.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DmmError
from .lasso import fit_datamodels
from .lds import measure

DEFAULT_VAL_FRACTION = 0.1


@dataclass
class ChunkFit:
    weight: np.ndarray      # β (n_train, t, k), applies to raw 0/1 masks
    bias: np.ndarray        # β0 (t, k)
    lam: np.ndarray         # chosen λ (t, k)
    lds: np.ndarray         # per (x, c) on held-out models (t, k)
    lds_margin: np.ndarray  # margin LDS (t,)
    at_max_iter: int        # regressions whose refit stopped at max_iter before the duality gap reached tol


def validation_split(num_models: int, val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[slice, slice]:
    """(train rows, validation rows) of the fitting models: the last ⌈val_fraction·m⌉ models validate λ."""
    n_val = max(1, int(np.ceil(val_fraction * num_models)))
    if num_models - n_val < 2:
        raise DmmError(f"only {num_models} fitting models; train more subset models (need at least "
                       f"{n_val + 2} beyond the held-out ones)")
    return slice(0, num_models - n_val), slice(num_models - n_val, num_models)


def fit_target_chunk(masks_fit, logits_fit, masks_lds, logits_lds, labels, *,
                     path_length: int, val_fraction: float = DEFAULT_VAL_FRACTION, **solver) -> ChunkFit:
    """β, β0, λ and LDS for targets t of one chunk.

    masks_fit (m, n) bool and logits_fit (m, t, k): fitting models; masks_lds (H, n), logits_lds (H, t, k):
    held-out models for the LDS; labels (t,): the targets' classes (for the margin LDS).
    `solver` passes tol / max_iter / min_ratio / patience / design / device / warn on to `lasso.fit_datamodels`
    (masks stay bool: the solver widens them a row block at a time).
    """
    masks_fit = np.asarray(masks_fit)
    logits_fit = np.asarray(logits_fit, dtype=np.float32)
    m, t, k = logits_fit.shape
    train, val = validation_split(m, val_fraction)
    y = logits_fit.reshape(m, t * k)
    fit = fit_datamodels(masks_fit[train], y[train], masks_fit[val], y[val], path_length=path_length, **solver)
    weight = fit.weight.reshape(-1, t, k)
    bias = fit.bias.reshape(t, k)
    lds, lds_margin = measure(masks_lds, weight, bias, logits_lds, labels)
    return ChunkFit(weight, bias, fit.lam.reshape(t, k), lds, lds_margin, int(fit.at_max_iter.sum()))
