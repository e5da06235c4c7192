"""Input checks of the datamodel solver (`lasso`): each bad argument is one line naming it and the fix."""

from __future__ import annotations

import numpy as np
import torch


def as_2d(a, name: str) -> np.ndarray:
    """`a` as a 2-D numeric (or bool) numpy array; a 1-D target array becomes one column."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim == 1 and name.startswith("Y"):
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}; pass a (models, …) array")
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise ValueError(f"{name} has non-numeric dtype {a.dtype}; pass a numeric or bool array")
    return a


def check_xy(X, Y, xname: str = "X", yname: str = "Y", n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Masks X (m, n) and targets Y (m, t): one row per subset model, finite, n columns if given."""
    X = as_2d(X, xname)
    Y = as_2d(Y, yname)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"{xname} has {X.shape[0]} rows but {yname} has {Y.shape[0]}; "
            f"both need one row per subset model"
        )
    if X.shape[0] < 2:
        raise ValueError(f"{xname} has {X.shape[0]} rows; need at least 2 subset models")
    if n is not None and X.shape[1] != n:
        raise ValueError(
            f"{xname} has {X.shape[1]} columns but the training design has {n}; "
            f"use the same training points for every split"
        )
    if X.dtype != np.bool_ and not np.isfinite(X).all():
        raise ValueError(f"{xname} contains NaN or inf; masks must be finite 0/1 values")
    if not np.isfinite(Y).all():
        bad = np.flatnonzero(~np.isfinite(Y).all(axis=0))
        raise ValueError(
            f"{yname} contains NaN or inf in {bad.size} target column(s) (first: {bad[0]}); "
            f"drop or repair those targets before fitting"
        )
    return X, Y


def check_lam(lam, t: int) -> np.ndarray:
    """λ per target, (t,) float64, finite and ≥ 0 (a scalar applies to every target)."""
    lam = np.asarray(lam.detach().cpu().numpy() if isinstance(lam, torch.Tensor) else lam,
                     dtype=np.float64)
    if lam.ndim == 0:
        lam = np.full(t, float(lam))
    if lam.shape != (t,):
        raise ValueError(f"lam has shape {lam.shape} but there are {t} targets; pass one λ per target")
    if not np.isfinite(lam).all():
        raise ValueError("lam contains NaN or inf; pass finite λ ≥ 0")
    if (lam < 0).any():
        raise ValueError(f"lam has {(lam < 0).sum()} negative value(s); λ must be ≥ 0")
    return lam


def check_opts(tol, max_iter, dtype) -> None:
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol={tol}; pass a finite relative duality-gap tolerance ≥ 0, e.g. 1e-5")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter={max_iter}; pass an integer ≥ 1")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype}; use torch.float32 or torch.float64")


def check_path(path_length, min_ratio, patience=None) -> None:
    """The λ grid (length ≥ 1, ratio in (0, 1]) and the early stop of a target's path (≥ 1 or None)."""
    if int(path_length) < 1:
        raise ValueError(f"path_length={path_length}; need at least 1 λ on the path")
    if not (0 < min_ratio <= 1):
        raise ValueError(f"min_ratio={min_ratio}; pick a ratio in (0, 1], e.g. 1e-2")
    if patience is not None and int(patience) < 1:
        raise ValueError(f"patience={patience}; use an integer ≥ 1, or None for the whole path")
