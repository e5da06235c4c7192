"""Index files: the training ids of a forget set F (or of points to exclude), as txt, csv or npy."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DmmError


class IdsError(DmmError):
    """An unusable id file; the message names the problem and the fix."""


def _parse(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise IdsError(f"cannot read {path} ({e}); save ids with numpy.save") from None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise IdsError(f"cannot read {path} ({type(e).__name__}); give a text file of integer ids") from None
    tokens = text.replace(",", " ").split()
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        bad = next(t for t in tokens if not _is_number(t))
        raise IdsError(f"{path}: {bad!r} is not an integer id; list integer training indices") from None
    return np.array(values)


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def read_ids(path: str | Path, n_train: int, n_points: int | None = None) -> np.ndarray:
    """Sorted int64 training indices from the file `path` (txt, csv or npy), validated by `check_ids`."""
    path = Path(path)
    if not path.is_file():
        raise IdsError(f"id file {path} does not exist; give a txt, csv or npy file of training indices")
    return check_ids(_parse(path), n_train, n_points, source=str(path))


def check_ids(values, n_train: int, n_points: int | None = None, source: str = "the id list") -> np.ndarray:
    """Sorted int64 training indices, validated against S = {0..n_train-1}.

    Refused, each with a one-line IdsError: empty, non-integer, negative, duplicated and out-of-range
    ids, and ids n_train..n_points-1, which are held-out points in the store's point order.
    """
    raw = np.asarray(values).ravel()
    if raw.size == 0:
        raise IdsError(f"{source} holds no ids; list at least one training index")
    if not np.issubdtype(raw.dtype, np.number) or np.issubdtype(raw.dtype, np.complexfloating):
        raise IdsError(f"{source} holds {raw.dtype} values; list integer training indices")
    if not np.all(np.isfinite(raw)) or np.any(np.mod(raw, 1) != 0):
        bad = raw[~np.isfinite(raw) | (np.mod(raw, 1) != 0)][0]
        raise IdsError(f"{source}: {bad} is not an integer id; list integer training indices")
    if raw.min() < 0:  # range checks before the int64 cast, which would wrap huge values
        raise IdsError(f"{source}: id {int(raw.min())} is negative; ids are training indices 0..{n_train - 1}")
    if raw.max() >= n_train:
        bad = int(raw.max())
        if n_points is not None and bad < n_points:
            raise IdsError(f"{source}: id {bad} is a held-out point; only training indices 0..{n_train - 1} "
                           "can be forgotten")
        raise IdsError(f"{source}: id {bad} is out of range; ids are training indices 0..{n_train - 1}")
    ids = raw.astype(np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise IdsError(f"{source}: id {uniq[counts > 1][0]} is listed {counts[counts > 1][0]} times; "
                       "list each id once")
    return uniq
