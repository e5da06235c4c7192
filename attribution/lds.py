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

DEFAULT_HOLDOUT = 100  # H: the subset models `dmm fit` and `dmm trak` hold out for the LDS unless told
MIN_MODELS = 6         # the fewest a store can be fitted on: 3 held out, 3 to fit (2 to train, 1 to validate λ)


def lds(pred: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Spearman correlation over models (axis 0) of pred vs real, (H, ...) → (...).

    A constant prediction of a varying output (e.g. an all-zero datamodel) scores 0: it predicts none of
    the output's variation, and dropping it as undefined would inflate the mean. NaN only where the real
    output itself is constant (nothing to predict).
    """
    pred, real = np.asarray(pred), np.asarray(real)
    if pred.shape != real.shape or pred.ndim < 1:
        raise DmmError(f"LDS needs predictions and outputs of one shape (H, ...), got {pred.shape} and {real.shape}; "
                       "fix: evaluate both on the same held-out models and targets")
    from scipy.stats import rankdata  # here, not at import: scipy.stats alone is most of a second of `dmm`'s start

    rp = rankdata(pred, axis=0)
    rr = rankdata(real, axis=0)
    rp -= rp.mean(axis=0)
    rr -= rr.mean(axis=0)
    pp, rr2 = (rp * rp).sum(0), (rr * rr).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (rp * rr).sum(0) / np.sqrt(pp * rr2)
    return np.where((pp == 0) & (rr2 > 0), 0.0, corr)


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


def default_holdout(num_models: int) -> int:
    """H where no one chose it (`dmm demo`, `dmm evaluate` building a store): `DEFAULT_HOLDOUT`, or a fifth of a
    store of fewer than 2·`DEFAULT_HOLDOUT` models (at least 3), so that most of a small store fits the datamodels."""
    return DEFAULT_HOLDOUT if num_models >= 2 * DEFAULT_HOLDOUT else max(3, num_models // 5)


def holdout_split(num_models: int, holdout: int) -> tuple[slice, slice]:
    """(fitting rows, LDS rows) of a store snapshot: the first ``holdout`` models are held out.

    Holding out the *first* models keeps the held-out set fixed while later blocks are added.
    """
    if not 3 <= holdout <= num_models - 2:
        raise DmmError(f"cannot hold out {holdout} of {num_models} subset models (need 3 <= H <= {num_models - 2}); "
                       "fix: pass a different --holdout-models or train more subset models with `dmm estimate`")
    return slice(holdout, num_models), slice(0, holdout)


def summarize(values: np.ndarray) -> dict:
    """Mean and quartiles of the finite values; n counts them, ``undefined`` the NaN ones left out.

    NaN marks a target whose real output never varies (see :func:`lds`) or one not measured yet.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    undefined = int(np.isnan(v).sum())
    v = v[np.isfinite(v)]
    if v.size == 0:
        nan = float("nan")
        return {"mean": nan, "q25": nan, "median": nan, "q75": nan, "n": 0, "undefined": undefined}
    q25, median, q75 = np.percentile(v, [25, 50, 75])
    return {"mean": float(v.mean()), "q25": float(q25), "median": float(median), "q75": float(q75),
            "n": int(v.size), "undefined": undefined}


def format_summary(name: str, summary: dict) -> str:
    """One line: ``LDS <name>: mean 0.312 | q25 0.201  median 0.305  q75 0.418 (n=1797)``, plus
    ``, 3 undefined left out`` when some values were NaN."""
    s = summary
    left_out = f", {s['undefined']} undefined left out" if s.get("undefined") else ""
    return (f"LDS {name}: mean {s['mean']:.3f} | q25 {s['q25']:.3f}  median {s['median']:.3f}  "
            f"q75 {s['q75']:.3f} (n={s['n']}{left_out})")


def report(per_class: np.ndarray, margin: np.ndarray, n_train: int) -> dict[str, dict]:
    """The LDS summaries `dmm fit` and `dmm trak` print, by name: held-out then train points, per class then margin.

    per_class (p, k) and margin (p,) are a fit group's ``lds`` and ``lds_margin``; the first n_train points are train points.
    """
    per_class, margin, n = np.asarray(per_class), np.asarray(margin), n_train
    return {"held-out points, per class": summarize(per_class[n:]), "held-out points, margin": summarize(margin[n:]),
            "train points, per class": summarize(per_class[:n]), "train points, margin": summarize(margin[:n])}


def format_report(summaries: dict[str, dict]) -> list[str]:
    """One indented :func:`format_summary` line per entry of :func:`report`."""
    return ["  " + format_summary(name, summary) for name, summary in summaries.items()]
