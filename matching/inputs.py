"""Checks that a deletion request's inputs fit its store: dataset, model files and the forget set F.

Every check runs before a request writes anything, and each failure is one `MatchingError` line.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch import nn

from attribution.checkpoint import load_model, load_state
from attribution.datasets import Dataset, check_fingerprint, load_dataset
from attribution.ids import check_ids, read_ids
from attribution.store import AttributionStore

from .errors import MatchingError


def store_dataset(store: AttributionStore, data: Dataset | None = None) -> Dataset:
    """The store's dataset S (loaded by name unless given), refused if its fingerprint differs."""
    spec = store.spec
    data = data if data is not None else load_dataset(spec.dataset)
    check_fingerprint(data, spec.fingerprint, f"store {store.url}")
    return data


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def load_store_model(path: str | Path, store: AttributionStore, data: Dataset, trust_code: bool = False,
                     device: str = "cpu") -> tuple[nn.Module, dict]:
    """(θ on `device`, sidecar) from `path`, refused unless it was trained for the store's data, model, k and
    recipe; a `module:callable` model is imported only with `trust_code` (attribution/models.py)."""
    _, meta = load_state(path)
    spec = store.spec
    expected = {"fingerprint": spec.fingerprint, "model": spec.model, "num_classes": spec.num_classes,
                "recipe": spec.recipe}
    diff = [f"{key} {_canonical(meta.get(key))[:40]} vs store {_canonical(want)[:40]}"
            for key, want in expected.items() if _canonical(meta.get(key)) != _canonical(want)]
    if diff:
        raise MatchingError(f"model {path} does not match store {store.url} ({'; '.join(diff)}); give a model "
                            "trained on the store's dataset with its model and recipe")
    return load_model(path, data, trust_code=trust_code, device=device)


def forget_set(forget_ids, store: AttributionStore) -> np.ndarray:
    """F as sorted unique int64 training indices, from an id file (txt, csv, npy) or a sequence of ints.

    Refused: empty, non-integer, negative, duplicated, out-of-range and held-out ids.
    """
    n_train, n_points = store.spec.n_train, store.spec.n_points
    if isinstance(forget_ids, (str, Path)):
        return read_ids(forget_ids, n_train, n_points)
    return check_ids(forget_ids, n_train, n_points, source="the forget set")
