"""Linear datamodeling score (LDS), DESIGN.md §2.

For a target output f_{x,c} and held-out subset models j = 1..H (never used in fitting),
the datamodel prediction is f̂_{x,c}(S_j) = β0_{x,c} + Σ_{i∈S_j} β_{i,x,c}; the LDS of (x, c) is
the Spearman correlation over j between f̂_{x,c}(S_j) and the real f_{x,c}(A(S_j)). The margin
LDS compares the margin of the predicted k-logit vector with the real margin.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import DmmError
from .evaluation import margins


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..H along axis 0 of a (H, ...) array; tied values share their average rank."""
    a = np.asarray(a)
    order = np.argsort(a, axis=0, kind="stable")
    ordered = np.take_along_axis(a, order, axis=0)
    pos = np.arange(a.shape[0]).reshape((-1,) + (1,) * (a.ndim - 1))
    pos = np.broadcast_to(pos, a.shape)
    starts = np.ones(a.shape, dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    ends = np.ones(a.shape, dtype=bool)
    ends[:-1] = starts[1:]
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=0)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, pos, a.shape[0]), axis=0), axis=0), axis=0)
    ranks = np.empty(a.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=0)
    return ranks


def lds(pred: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Spearman correlation over models (axis 0) of pred vs real, (H, ...) → (...); NaN if a column is constant."""
    pred, real = np.asarray(pred), np.asarray(real)
    if pred.shape != real.shape or pred.ndim < 1:
        raise DmmError(f"LDS needs predictions and outputs of one shape (H, ...), got {pred.shape} and {real.shape}; "
                       "fix: evaluate both on the same held-out models and targets")
    rp = average_ranks(pred)
    rr = average_ranks(real)
    rp -= rp.mean(axis=0)
    rr -= rr.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rp * rr).sum(0) / np.sqrt((rp * rp).sum(0) * (rr * rr).sum(0))


def predict(masks: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Datamodel outputs f̂_{x,c}(S_j) = β0_{x,c} + Σ_{i∈S_j} β_{i,x,c}: masks (H, n), weight (n, t, k), bias (t, k) → (H, t, k)."""
    masks = np.asarray(masks, dtype=np.float32)
    n, t, k = weight.shape
    return (masks @ np.asarray(weight, dtype=np.float32).reshape(n, t * k)).reshape(-1, t, k) + bias


def measure(masks: np.ndarray, weight: np.ndarray, bias: np.ndarray, logits: np.ndarray,
            labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LDS of one target chunk on held-out models: per (target, class) (t, k) and for the margin (t,).

    masks (H, n) and logits (H, t, k) come from the held-out subset models; labels (t,) are the targets' classes.
    """
    pred = predict(masks, weight, bias)
    real = np.asarray(logits, dtype=np.float32)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    pred_margin = margins(torch.from_numpy(pred), labels).numpy()
    real_margin = margins(torch.from_numpy(real), labels).numpy()
    return lds(pred, real), lds(pred_margin, real_margin)


def holdout_split(num_models: int, holdout: int) -> tuple[slice, slice]:
    """(fitting rows, LDS rows) of a store snapshot: the first ``holdout`` models are held out.

    Holding out the *first* models keeps the held-out set fixed while later blocks are added.
    """
    if not 3 <= holdout <= num_models - 2:
        raise DmmError(f"cannot hold out {holdout} of {num_models} subset models (need 3 <= H <= {num_models - 2}); "
                       "fix: pass a different --holdout-models or train more subset models with `dmm estimate`")
    return slice(holdout, num_models), slice(0, holdout)


def summarize(values: np.ndarray) -> dict:
    """Mean and quartiles of the finite values (NaN = constant output or not measured); n counts them."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "q25": float("nan"), "median": float("nan"), "q75": float("nan"), "n": 0}
    q25, median, q75 = np.percentile(v, [25, 50, 75])
    return {"mean": float(v.mean()), "q25": float(q25), "median": float(median), "q75": float(q75), "n": int(v.size)}


def format_summary(name: str, summary: dict) -> str:
    """One line: ``LDS <name>: mean 0.312 | q25 0.201  median 0.305  q75 0.418 (n=1797)``."""
    s = summary
    return (f"LDS {name}: mean {s['mean']:.3f} | q25 {s['q25']:.3f}  median {s['median']:.3f}  "
            f"q75 {s['q75']:.3f} (n={s['n']})")
