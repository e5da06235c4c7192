"""`dmm fit`: the datamodels of every target, chunk by chunk, out of core, with Dask.

The subset logits are a Dask array over the Zarr store (`from_zarr`); each task reads one chunk of
targets (all m fitting models × T points × k classes), solves its T·k regressions, measures their
LDS on the H held-out models and writes its own chunk of `datamodels/` (marker last). So memory grows
with T, not with the number of targets, and a rerun fits only chunks without a marker.

Schedulers: local threads by default; `--address` with a Ray cluster (or `RAY_ADDRESS`) runs the same
graph with Dask-on-Ray (`ray.util.dask.ray_dask_get`), `tcp://HOST:PORT` on a dask.distributed scheduler.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from tqdm import tqdm

from attribution.datamodels import DEFAULT_VAL_FRACTION, fit_target_chunk
from attribution.datasets import load_dataset
from attribution.errors import DmmError
from attribution.lasso import DEFAULT_MAX_ITER, DEFAULT_PATH_LENGTH, DEFAULT_TOL
from attribution.lds import format_summary, holdout_split, summarize
from attribution.store import AttributionStore

from .ray_runtime import cluster_address, connect


@dataclass(frozen=True)
class FitConfig:
    holdout_models: int = 100
    path_length: int = DEFAULT_PATH_LENGTH
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER
    targets_per_chunk: int = 256
    rows_per_chunk: int = 1
    val_fraction: float = DEFAULT_VAL_FRACTION

    def as_attrs(self) -> dict:
        """What fixes the fitted β (recorded in the group; a resume must match it)."""
        return {"holdout_models": self.holdout_models, "path_length": self.path_length,
                "val_fraction": self.val_fraction, "tol": self.tol, "max_iter": self.max_iter}


def _scheduler(address: str | None, workers: int):
    """(dask `get`/scheduler name, kwargs) for threads, Dask-on-Ray or dask.distributed."""
    if address and address.startswith("tcp://"):
        try:
            from distributed import Client
        except ImportError:
            raise DmmError("a tcp:// address needs dask.distributed; pip install distributed") from None
        return Client(address).get, {}
    if cluster_address(address):
        connect(address)
        try:
            from ray.util.dask import ray_dask_get
        except ImportError as e:
            raise DmmError(f"Dask-on-Ray cannot be imported ({e}); pip install pandas pyarrow") from None
        return ray_dask_get, {}
    return "threads", {"num_workers": workers}


def _fit_and_write(store_url, prefix, chunk, masks_fit, logits_fit, masks_lds, logits_lds, labels, config):
    fit = fit_target_chunk(masks_fit, logits_fit, masks_lds, logits_lds, labels,
                           path_length=config.path_length, val_fraction=config.val_fraction,
                           tol=config.tol, max_iter=config.max_iter)
    group = AttributionStore.open(store_url, "r+").fit_group(prefix)
    group.write_chunk(chunk, fit.weight, fit.bias, fit.lam, fit.lds, fit.lds_margin)
    return chunk


def _watch(group, total: int, stop: threading.Event) -> None:
    """Progress bar over target chunks, read from the store's markers (works with any scheduler)."""
    with tqdm(total=total, initial=len(group.completed_chunks()), unit="chunk", desc="fit") as bar:
        while not stop.wait(0.5):
            bar.update(len(group.completed_chunks()) - bar.n)
        bar.update(len(group.completed_chunks()) - bar.n)


def _refuse_other_settings(store, prefix: str, config: FitConfig, num_models: int) -> None:
    """Before anything is written: a group fitted with other settings is not resumed; name what differs."""
    if not store.has_fit_group(prefix):
        return
    group = store.fit_group(prefix)
    s = store.spec
    have = {"targets_per_chunk": group.target_chunk, "rows_per_chunk": group.row_chunk, **group.config}
    want = {"targets_per_chunk": min(config.targets_per_chunk, s.n_points),
            "rows_per_chunk": min(config.rows_per_chunk, s.n_train), **config.as_attrs(), "num_models": num_models}
    diff = [f"{k}={have.get(k)!r} (now {v!r})" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise DmmError(f"{prefix}/ in {store.url} was fitted with other settings: {', '.join(diff)}; fix: rerun "
                       f"with the settings it was fitted with to resume, or delete {prefix}/ (or fit a copy) to refit")


def fit_store(store_url: str, config: FitConfig = FitConfig(), address: str | None = None,
              workers: int = 1, prefix: str = "datamodels") -> dict:
    """Fit every missing target chunk of `prefix` and return the LDS summaries."""
    store = AttributionStore.open(store_url, "r+")
    blocks = store.completed_blocks()
    if not blocks:
        raise DmmError(f"store {store_url} has no completed subset models; run `dmm estimate` first")
    masks = store.read_masks(blocks)
    fit_rows, lds_rows = holdout_split(len(masks), config.holdout_models)
    rows = np.concatenate([np.arange(store.block_rows(b).start, store.block_rows(b).stop) for b in blocks])
    data = load_dataset(store.spec.dataset)
    if data.fingerprint != store.fingerprint:
        raise DmmError(f"dataset {data.name} no longer matches store {store_url} (fingerprint); use the data "
                       "the store was estimated on")
    _refuse_other_settings(store, prefix, config, len(masks))
    group = store.create_fit_group(prefix, config.targets_per_chunk, config.rows_per_chunk,
                                   {**config.as_attrs(), "num_models": len(masks)})
    # dask chunks = one block × one target chunk: a task reads only its targets (the zarr chunk spans all points)
    logits = da.from_zarr(store.zarr_array("subsets/logits"),
                          chunks=(store.block_size, group.target_chunk, store.spec.num_classes))[rows]
    labels = data.all_labels().numpy()
    tasks = []
    for chunk in group.missing_chunks():
        sl = group.target_slice(chunk)
        tasks.append(dask.delayed(_fit_and_write)(
            store_url, prefix, chunk, masks[fit_rows], logits[fit_rows, sl], masks[lds_rows],
            logits[lds_rows, sl], labels[sl], config, dask_key_name=f"fit-chunk-{chunk}"))
    get, kwargs = _scheduler(address, workers)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(group, group.num_chunks, stop), daemon=True)
    watcher.start()
    try:
        dask.compute(*tasks, scheduler=get, **kwargs)
    finally:
        stop.set()
        watcher.join()
    per_class, margin = np.asarray(group.lds[:]), np.asarray(group.lds_margin[:])
    n = store.spec.n_train
    return {
        "models": len(masks), "fitting_models": fit_rows.stop - fit_rows.start,
        "holdout_models": config.holdout_models, "chunks_fitted": len(tasks),
        "lds_train": summarize(per_class[:n]), "lds_heldout": summarize(per_class[n:]),
        "lds_margin_train": summarize(margin[:n]), "lds_margin_heldout": summarize(margin[n:]),
    }


def format_report(report: dict) -> list[str]:
    lines = [f"fitted {report['chunks_fitted']} target chunks on {report['fitting_models']} subset models; "
             f"LDS on {report['holdout_models']} held-out models:"]
    for key, name in (("lds_heldout", "held-out points, per class"), ("lds_margin_heldout", "held-out points, margin"),
                      ("lds_train", "train points, per class"), ("lds_margin_train", "train points, margin")):
        lines.append("  " + format_summary(name, report[key]))
    return lines
