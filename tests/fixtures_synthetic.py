"""A synthetic attribution store: random β per fit group and random θ0 logits, for tests that need exact sums."""
from __future__ import annotations

import numpy as np

from attribution.store import AttributionStore, StoreSpec

N_TRAIN, N_POINTS, K = 12, 17, 3


def synthetic_store(url, fit=("datamodels", "trak"), complete=True):
    """A store with random β per fit group (rows = one chunk each) and random θ0 logits."""
    spec = StoreSpec(dataset="synthetic", fingerprint="0" * 64, model="mlp", recipe={}, alpha=0.5, seed=0,
                     block_size=4, n_train=N_TRAIN, n_points=N_POINTS, num_classes=K)
    store = AttributionStore.open_or_create(str(url), spec, 4)
    rng = np.random.default_rng(0)
    betas = {}
    for prefix in fit:
        group = store.create_fit_group(prefix, target_chunk=8, row_chunk=1)
        betas[prefix] = rng.standard_normal((N_TRAIN, N_POINTS, K)).astype(np.float32)
        for c in range(group.num_chunks - (0 if complete else 1)):
            sl = group.target_slice(c)
            group.write_chunk(c, betas[prefix][:, sl], np.zeros((sl.stop - sl.start, K)))
    original = rng.standard_normal((N_POINTS, K)).astype(np.float32)
    store.write_original_logits(original, "a" * 64)
    return store, betas, original
