"""Random α-subsets S_1..S_m of the training set, reproducible per block of models.

Block b of size B holds models b·B .. b·B+B−1; its masks and seeds are drawn from
SeedSequence([root_seed, b]) alone, so any worker (or a retry) derives the same block.
Each subset has exactly round(α·n) points, as in the datamodels paper.
"""
from __future__ import annotations

import numpy as np

from .errors import DmmError


def block_subsets(root_seed: int, block: int, block_size: int, n_train: int, alpha: float):
    """(masks (B, n) bool, seeds (B,) int64) of block `block`."""
    if not 0 < alpha < 1:
        raise DmmError(f"alpha={alpha} must lie strictly between 0 and 1; e.g. --alpha 0.5")
    rng = _block_rng(root_seed, block)
    size = max(1, int(round(alpha * n_train)))
    masks = np.zeros((block_size, n_train), dtype=bool)
    for row in masks:
        row[rng.choice(n_train, size=size, replace=False)] = True
    seeds = rng.integers(0, 2**62, size=block_size, dtype=np.int64)
    return masks, seeds


def block_seeds(root_seed: int, block: int, block_size: int) -> np.ndarray:
    """Seeds (B,) int64 of block `block` for models trained on all of S (no subsets to draw)."""
    return _block_rng(root_seed, block).integers(0, 2**62, size=block_size, dtype=np.int64)


def _block_rng(root_seed: int, block: int) -> np.random.Generator:
    """The generator of block `block`: SeedSequence([root_seed, block]) alone."""
    return np.random.default_rng(np.random.SeedSequence([int(root_seed), int(block)]))
