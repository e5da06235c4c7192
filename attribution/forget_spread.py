"""The spread a retrained model adds on a forgotten point: s_x, for DMM's targets (README, "DMM's spread on F").

DM-Direct predicts the *mean* effect of retraining without F; a retrained model is one draw around it. On a point
it never saw, a model is less sure and varies more over seeds than on a point it trained on, so targets that
shift θ0's outputs alike for every model keep θ0's narrow spread on F, and KLoM, which compares each point's
margin distribution over models, reads them as far from the oracles'. The store's subset models measure the
extra variance of the margin m_x = f_x[y_x] − logsumexp_{c≠y_x} f_x[c] (`attribution.evaluation.margins`):
Var_out(m_x) − Var_in(m_x), over the models whose subset left x out and those that held it. They were trained on
different α·n-point subsets, and such models vary more than models that differ by their seed only, as retrained
ones do; the calibration's K models trained on all of S scale it to those (without them, K < 2, its M models on
α'-subsets, whose own subsets differ: a little more spread):

    γ² = mean_x Var_full(m_x) / mean_x Var_in,α(m_x),    s_x = γ·sqrt(max(Var_out(m_x) − Var_in(m_x), 0)),

for every training point x (0 where fewer than 2 models fall on either side). `dmm calibrate` keeps s as the fit
group's array `forget_spread` and γ in its record; DMM's `spread` a adds a·s_x·z_x, z_x ~ N(0, 1) from its seed,
to the true-class logit of its target on every x ∈ F, which moves the margin by exactly that.
"""
from __future__ import annotations

import numpy as np
import torch

from .evaluation import margins
from .subset_blocks import SubsetBlocks

POINT_CHUNK = 4096  # training points per read of the store's subset logits


def masked_variance(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per column of values (M, P), the variance over the rows where mask (M, P) holds; NaN below 2 rows."""
    count = mask.sum(axis=0)
    total = np.where(mask, values, 0.0).sum(axis=0)
    mean = total / np.maximum(count, 1)
    squares = np.where(mask, (values - mean) ** 2, 0.0).sum(axis=0)
    return np.where(count >= 2, squares / np.maximum(count, 1), np.nan)


def margins_of(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """m_x of every model (M, P) from logits (M, P, k) and labels (P,), in float64."""
    return margins(torch.from_numpy(np.asarray(logits, dtype=np.float64)), torch.from_numpy(labels)).numpy()


def subset_variances(store: SubsetBlocks, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Var_in, Var_out) of m_x over the store's subset models, per training point, read POINT_CHUNK points at
    a time."""
    blocks = store.completed_blocks()
    masks = store.read_masks(blocks)
    parts = []
    for lo in range(0, masks.shape[1], POINT_CHUNK):
        columns = slice(lo, min(lo + POINT_CHUNK, masks.shape[1]))
        m = margins_of(store.read_logits(blocks, targets=columns), labels[columns])
        inside = masks[:, columns]
        parts.append((masked_variance(m, inside), masked_variance(m, ~inside)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def forget_spread(var_in: np.ndarray, var_out: np.ndarray, reference: np.ndarray) -> tuple[float, np.ndarray]:
    """(γ, s) from the store's per-point Var_in, Var_out and the reference models' variance Var_full (all (n,),
    NaN: too few models)."""
    gamma = float(np.sqrt(np.nanmean(reference) / np.nanmean(var_in)))
    extra = np.nan_to_num(var_out - var_in, nan=0.0)
    return gamma, (gamma * np.sqrt(np.maximum(extra, 0.0))).astype(np.float32)
