"""Digits attribution stores with fitted datamodels, for tests (`digits_store`) and benchmarks (`build_store`),
and the helpers tests share (`tree_hashes`, `np_margin`).

Fitting datamodels for all 1797 × 10 targets of full digits takes minutes on 2 cores (every solver
iteration is an n² × targets product), so the store is built on a class-balanced digits subset:
30 training and 20 held-out points per class (n = 300, 500 points), saved as an npz dataset.
`digits_store(base_dir)` trains m subset models (α = 0.5, the store's own blocks) with the default
digits recipe, fits datamodels for every target with `attribution.lasso.fit_datamodels` (the last
models pick λ; a short, loose λ path), and writes `datamodels/` chunked as `dmm fit` chunks it by
default (FitConfig: 256 targets, one training point per row chunk): the 500 points make 2 target
chunks, so readers cross a chunk boundary, and a reader of β rows touches only the rows it asks for.
Callers that make requests copy the store first (`copy_store`).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribution.checkpoint import model_meta, save_model
from attribution.datasets import Dataset, load_dataset
from attribution.engine import train_batched
from attribution.recipes import Recipe, default_recipe
from attribution.row_copy import write_row_copy
from attribution.store import AttributionStore, StoreSpec
from attribution.subsets import block_subsets

MODEL = "mlp"
BLOCK_SIZE = 100
TRAIN_PER_CLASS, HELD_OUT_PER_CLASS = 30, 20
LASSO = dict(path_length=4, min_ratio=0.05, tol=1e-3, max_iter=30)


@dataclass(frozen=True)
class DigitsStore:
    url: str
    data: Dataset
    recipe: Recipe
    model: str = MODEL

    def spec(self, **changes) -> StoreSpec:
        d = self.data
        fields = dict(dataset=d.name, fingerprint=d.fingerprint, model=self.model, recipe=self.recipe.to_dict(),
                      alpha=0.5, seed=0, block_size=BLOCK_SIZE, n_train=d.n_train, n_points=d.n_points,
                      num_classes=d.num_classes)
        return StoreSpec(**{**fields, **changes})


_built: dict[tuple, DigitsStore] = {}


def digits_store(base_dir: str | Path, num_models: int = 400, val_models: int = 40) -> DigitsStore:
    """The store under base_dir, built on this process's first call with these arguments."""
    key = (str(base_dir), num_models, val_models)
    if key not in _built:
        _built[key] = build_digits_store(Path(base_dir), num_models, val_models)
    return _built[key]


def digits_subset(path: Path) -> Dataset:
    """The first TRAIN_PER_CLASS / HELD_OUT_PER_CLASS points of each class of digits, as `npz:path`."""
    full = load_dataset("digits")

    def per_class(labels, count):
        labels = labels.numpy()
        return np.sort(np.concatenate([np.flatnonzero(labels == c)[:count] for c in range(full.num_classes)]))

    tr, te = per_class(full.y_train, TRAIN_PER_CLASS), per_class(full.y_test, HELD_OUT_PER_CLASS)
    np.savez(path, x_train=full.x_train.numpy()[tr], y_train=full.y_train.numpy()[tr],
             x_test=full.x_test.numpy()[te], y_test=full.y_test.numpy()[te])
    return load_dataset(f"npz:{path}")


def build_digits_store(base_dir: Path, num_models: int, val_models: int) -> DigitsStore:
    base_dir.mkdir(parents=True, exist_ok=True)
    data = digits_subset(base_dir / "digits-subset.npz")
    return build_store(base_dir / f"digits-{num_models}.zarr", data, num_models, val_models, LASSO)


def build_store(url: Path, data: Dataset, num_models: int, val_models: int, lasso: dict, model: str = MODEL,
                recipe: Recipe | None = None) -> DigitsStore:
    """Subset models of `data` (`model`, `recipe` or the digits MLP's) and datamodels fitted with `lasso` settings."""
    from attribution.lasso import fit_datamodels
    from cluster.fit import FitConfig  # the CLI's chunking (imported here: it pulls in Ray)

    fixture = DigitsStore(str(url), data, recipe or default_recipe("digits"), model)
    store = AttributionStore.open_or_create(fixture.url, fixture.spec(), num_models)
    for block in store.missing_blocks():
        masks, seeds = block_subsets(0, block, BLOCK_SIZE, data.n_train, 0.5)
        store.write_block(block, masks, train_batched(model, data, fixture.recipe, seeds, masks).logits.numpy())
    masks, logits, _ = store.read()
    x, y = masks.astype(np.float32), logits.reshape(len(masks), -1)
    # LASSO's max_iter=30 cuts most refits short on purpose (the fixture's speed): no warning for it
    fit = fit_datamodels(x[:-val_models], y[:-val_models], x[-val_models:], y[-val_models:], **lasso, warn=False)
    shape = (data.n_points, data.num_classes)
    weight, bias, lam = fit.weight.reshape(data.n_train, *shape), fit.bias.reshape(shape), fit.lam.reshape(shape)
    group = store.create_fit_group("datamodels", target_chunk=FitConfig.targets_per_chunk,
                                   row_chunk=FitConfig.rows_per_chunk, config=lasso)
    for c in range(group.num_chunks):
        sl = group.target_slice(c)
        group.write_chunk(c, weight[:, sl], bias[sl], lam[sl])
    write_row_copy(group)  # what `dmm fit` writes last: the row-major β that requests read
    return fixture


def copy_store(fixture: DigitsStore, dest: str | Path) -> str:
    """A private copy of the store, for tests that make requests against it."""
    shutil.copytree(fixture.url, dest)
    return str(dest)


def train_and_save(fixture: DigitsStore, paths, seeds, excluded=()) -> list[Path]:
    """Train one model per seed on S∖excluded with the store's recipe (one batched pass) and save each."""
    data = fixture.data
    mask = np.ones(data.n_train, dtype=bool)
    mask[np.asarray(excluded, dtype=np.int64)] = False
    trained = train_batched(fixture.model, data, fixture.recipe, seeds, np.stack([mask] * len(seeds)))
    meta_excluded = [int(i) for i in excluded]
    for b, (path, seed) in enumerate(zip(paths, seeds)):
        save_model(path, trained.state_dict(b), model_meta(data, fixture.model, fixture.recipe, int(seed), excluded=meta_excluded))
    return [Path(p) for p in paths]


def tree_hashes(*roots) -> dict[str, str]:
    """sha256 of every file under each root (or of the root itself if it is a file), keyed by its path
    relative to the roots' common folder: one directory's keys are relative to it, so two copies compare equal."""
    roots = [Path(r).resolve() for r in roots]
    base = Path(os.path.commonpath(roots))
    base = base.parent if base.is_file() else base
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out.update({str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return out


def np_margin(z, label: int) -> np.ndarray:
    """z (..., k): z_label − logsumexp of the other logits, in float64 (the margin, by numpy alone)."""
    z = np.asarray(z, dtype=np.float64)
    others = np.delete(z, label, axis=-1)
    mx = others.max(-1, keepdims=True)
    return z[..., label] - (mx[..., 0] + np.log(np.exp(others - mx).sum(-1)))
