"""KLoM, the KL divergence of margins (DESIGN.md §2), vectorised over points.

For each point x, two samples of margins (N_a oracles, N_b unlearned models) are clipped to
[−clip, clip] and counted in `bins` equal bins spanning the pair's combined min..max (the maximum
belongs to the last bin, as in `np.histogram`; a point whose values are all equal gets one bin of
width 1). With p, q the normalised counts of the first and second sample (p = oracle by default),
q is floored at eps where p > 0 and renormalised, and KLoM(x) = Σ_b p_b log(p_b / q_b) — the
value `scipy.stats.entropy(p, q_floored)` gives, as in the reference benchmark's own code.
Computed in float64. `spread_ratio` goes beside it: how wide a population's margins are against the oracles'.
"""
from __future__ import annotations

import numpy as np
from scipy.special import rel_entr

from .errors import MatchingError

DIRECTIONS = ("oracle||unlearned", "unlearned||oracle")


def _margin_samples(name: str, values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1:
        raise MatchingError(f"{name} margins must be a (models, points) array with at least one model, "
                            f"got shape {values.shape}; stack one row of margins per model")
    bad = np.isnan(values).any(axis=0)
    if bad.any():
        raise MatchingError(f"{name} margins hold NaN at {int(bad.sum())} point(s) (first: {int(np.argmax(bad))}); "
                            "a model diverged: drop it or fix its training before computing KLoM")
    return values


def _paired_samples(oracle_margins, unlearned_margins) -> tuple[np.ndarray, np.ndarray]:
    """Both samples checked, on the same points."""
    oracle = _margin_samples("oracle", oracle_margins)
    unlearned = _margin_samples("unlearned", unlearned_margins)
    if oracle.shape[1] != unlearned.shape[1]:
        raise MatchingError(f"oracle margins cover {oracle.shape[1]} points but unlearned margins {unlearned.shape[1]}; "
                            "give both on the same points in the same order")
    return oracle, unlearned


def _bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts (P, bins) of each column of values (N, P) in its row of equal-width edges (P, bins + 1).

    The index is computed from the bin width, then corrected against the edges exactly as
    `np.histogram` does, so a value on an edge lands in the same bin as there.
    """
    points, bins = edges.shape[0], edges.shape[1] - 1
    lo, hi = edges[:, 0], edges[:, -1]
    idx = np.floor((values - lo) * (bins / (hi - lo))).astype(np.int64)
    np.clip(idx, 0, bins - 1, out=idx)
    cols = np.arange(points)
    idx -= values < edges[cols, idx]
    idx += (values >= edges[cols, idx + 1]) & (idx != bins - 1)
    flat = (idx + cols * bins).ravel()
    return np.bincount(flat, minlength=points * bins).reshape(points, bins).astype(np.float64)


def klom(oracle_margins, unlearned_margins, bins: int = 20, clip: float = 100.0, eps: float = 1e-5,
         direction: str = "oracle||unlearned") -> np.ndarray:
    """KLoM per point (P,) from oracle margins (N_a, P) and unlearned margins (N_b, P).

    direction "oracle||unlearned" is KL(oracle ‖ unlearned) (the default), "unlearned||oracle" the other.
    """
    if direction not in DIRECTIONS:
        raise MatchingError(f"unknown KLoM direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
    if int(bins) != bins or bins < 1 or not clip > 0 or not 0 < eps < 1:
        raise MatchingError(f"need an integer bins >= 1, clip > 0 and 0 < eps < 1, got bins={bins}, clip={clip}, "
                            f"eps={eps}; the reference is bins=20, clip=100, eps=1e-5")
    oracle, unlearned = _paired_samples(oracle_margins, unlearned_margins)
    first, second = (oracle, unlearned) if direction == DIRECTIONS[0] else (unlearned, oracle)
    first, second = np.clip(first, -clip, clip), np.clip(second, -clip, clip)
    lo = np.minimum(first.min(axis=0), second.min(axis=0))
    hi = np.maximum(first.max(axis=0), second.max(axis=0))
    hi = np.where(hi > lo, hi, lo + 1.0)
    edges = np.linspace(lo, hi, int(bins) + 1, axis=-1)
    p = _bin_counts(first, edges) / first.shape[0]
    q = _bin_counts(second, edges) / second.shape[0]
    q = np.where(p > 0, np.maximum(q, eps), q)
    q /= q.sum(axis=1, keepdims=True)
    return rel_entr(p, q).sum(axis=1)  # p log(p/q), 0 where p = 0


def spread_ratio(oracle_margins, unlearned_margins) -> float:
    """Mean over points of the unlearned models' margin sd (over models) over the oracles' mean sd: 1 where the
    unlearned population is as spread as the oracles.

    KLoM's reference direction, KL(oracle ‖ unlearned), rewards spread: q floored at eps is small wherever the
    unlearned sample is narrow, so noise added to the unlearned margins lowers it, even below the floor (README,
    "KLoM rewards spread"). A low KLoM with a ratio well above 1 is spread, not forgetting.
    """
    oracle, unlearned = _paired_samples(oracle_margins, unlearned_margins)
    return float(unlearned.std(axis=0).mean() / oracle.std(axis=0).mean())


def klom_summary(values, groups: dict) -> dict[str, dict[str, float]]:
    """The 95th percentile and the median of KLoM per group: {name: {"p95": …, "median": …}}.

    `values` is KLoM per point (P,); `groups` maps a name (forget, retain, heldout) to point indices.
    """
    values = np.asarray(values, dtype=np.float64)
    summary = {}
    for name, idx in groups.items():
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= values.size:
            raise MatchingError(f"group {name!r} must be non-empty indices in [0, {values.size}), "
                                f"got {idx.size} indices; build the groups from the same points as the KLoM values")
        summary[name] = {"p95": float(np.percentile(values[idx], 95)), "median": float(np.median(values[idx]))}
    return summary
