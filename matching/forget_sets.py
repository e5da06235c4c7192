"""Forget sets F named by a short spec (the evaluation's and the KLoM benchmark's kinds).

- ``random:SIZE:SEED``      SIZE training ids drawn uniformly without replacement (seeded).
- ``class:C:SIZE[:SEED]``   SIZE training ids of class C (non-IID), drawn at random (seed 0 by default).
- ``pc:K:SIZE:top|bottom``  the SIZE training points x with the largest (smallest) projection of their
  datamodel row on the K-th principal component (K = 1, 2, …) of the train × train datamodel matrix
  (as in the KLoM benchmark). Row x of that matrix is the linearised margin datamodel of x:
  M[x, i] = β_{i,x,y_x} − mean_{c≠y_x} β_{i,x,c}; the rows are centred before the PCA.
- ``ids:FILE``              the ids in FILE (txt, csv or npy).

Every kind returns sorted int64 training ids; bad specs get a one-line error naming the valid forms.
"""
from __future__ import annotations

import numpy as np
from sklearn.utils.extmath import randomized_svd

from attribution.datasets import Dataset
from attribution.ids import read_ids

from .errors import MatchingError

FORMS = "random:SIZE:SEED, class:C:SIZE[:SEED], pc:K:SIZE:top|bottom, ids:FILE"


class ForgetSetError(MatchingError):
    """An unusable forget-set spec; the message names the valid forms."""


def _ints(spec: str, parts: list[str]) -> list[int]:
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ForgetSetError(f"forget set {spec!r} has a non-integer field; use one of {FORMS}") from None


def parse_forget_set(spec: str) -> tuple[str, tuple]:
    """(kind, arguments) of a spec string, checked for form only (no data needed)."""
    kind, _, rest = str(spec).partition(":")
    parts = rest.split(":") if rest else []
    if kind == "ids" and rest:
        return kind, (rest,)
    if kind == "random" and len(parts) == 2:
        size, seed = _ints(spec, parts)
        return kind, (size, seed)
    if kind == "class" and len(parts) in (2, 3):
        values = _ints(spec, parts)
        return kind, (values[0], values[1], values[2] if len(values) == 3 else 0)
    if kind == "pc" and len(parts) == 3 and parts[2] in ("top", "bottom"):
        k, size = _ints(spec, parts[:2])
        if k < 1:
            raise ForgetSetError(f"forget set {spec!r}: principal components count from 1; use pc:1:SIZE:top")
        return kind, (k, size, parts[2])
    raise ForgetSetError(f"unknown forget set {spec!r}; use one of {FORMS}")


def _check_size(spec: str, size: int, available: int) -> None:
    if not 1 <= size <= available:
        raise ForgetSetError(f"forget set {spec!r} asks for {size} points but {available} are available; "
                             f"choose a size in 1..{available}")


def margin_datamodel_matrix(weight, labels: np.ndarray, n_train: int, chunk: int = 256) -> np.ndarray:
    """M (n_train × n_train): row x = β_{·,x,y_x} − mean_{c≠y_x} β_{·,x,c}, read target chunk by chunk.

    `weight` is the fit group's β array (n_train × n_points × k, Zarr or numpy).
    """
    k = weight.shape[2]
    out = np.empty((n_train, n_train), dtype=np.float32)
    for lo in range(0, n_train, chunk):
        hi = min(n_train, lo + chunk)
        beta = np.asarray(weight[:, lo:hi, :], dtype=np.float64)  # (n, t, k)
        y = labels[lo:hi]
        correct = np.take_along_axis(beta, y[None, :, None], axis=2)[..., 0]  # (n, t)
        others = (beta.sum(axis=2) - correct) / (k - 1)
        out[lo:hi] = (correct - others).T
    return out


def principal_component_scores(matrix: np.ndarray, component: int, seed: int = 0) -> np.ndarray:
    """Projection of every centred row of `matrix` on its `component`-th principal axis (1-based).

    The sign of a principal axis is arbitrary; it is fixed so that the largest |loading| is positive.
    """
    centred = matrix - matrix.mean(axis=0, keepdims=True)
    _, _, vt = randomized_svd(centred, n_components=component, n_iter=7, random_state=seed)
    axis = vt[component - 1]
    axis = axis * np.sign(axis[np.argmax(np.abs(axis))])
    return centred @ axis


def resolve_forget_set(spec: str, data: Dataset, fit=None) -> np.ndarray:
    """Sorted int64 training ids of F for `data`; `fit` (a FitGroup) is needed by ``pc:`` specs only."""
    kind, args = parse_forget_set(spec)
    n = data.n_train
    if kind == "ids":
        return read_ids(args[0], n, data.n_points)
    if kind == "random":
        size, seed = args
        _check_size(spec, size, n)
        return np.sort(np.random.default_rng(seed).choice(n, size, replace=False)).astype(np.int64)
    if kind == "class":
        c, size, seed = args
        labels = data.y_train.numpy()
        if not 0 <= c < data.num_classes:
            raise ForgetSetError(f"forget set {spec!r}: class {c} does not exist; use 0..{data.num_classes - 1}")
        members = np.flatnonzero(labels == c)
        _check_size(spec, size, len(members))
        return np.sort(np.random.default_rng(seed).choice(members, size, replace=False)).astype(np.int64)
    k, size, end = args
    if fit is None:
        raise ForgetSetError(f"forget set {spec!r} needs fitted datamodels; give the experiment an attribution store")
    _check_size(spec, size, n)
    if k > n:
        raise ForgetSetError(f"forget set {spec!r}: only {n} principal components exist; choose K <= {n}")
    scores = principal_component_scores(margin_datamodel_matrix(fit.weight, data.y_train.numpy(), n), k)
    order = np.argsort(scores, kind="stable")
    chosen = order[-size:] if end == "top" else order[:size]
    return np.sort(chosen).astype(np.int64)
