"""`dmm fit`: the datamodels of every target, chunk by chunk, out of core, with Dask.

The subset logits are a Dask array over the Zarr store (`from_zarr`); each task reads one chunk of
targets (all m fitting models × T points × k classes), solves its T·k regressions, measures their
LDS on the H held-out models and writes its own chunk of `datamodels/` (marker last). So memory grows
with T, not with the number of targets, and a rerun fits only chunks without a marker. Once every chunk
is done, the same scheduler writes β's row-major copy (`weight_rows`, for requests); a run on a complete
group without one (a store from before the copy existed) writes just that.

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
from attribution.datasets import check_fingerprint, load_dataset
from attribution.errors import DmmError
from attribution.lasso import DEFAULT_MAX_ITER, DEFAULT_PATH_LENGTH, DEFAULT_TOL
from attribution.lds import format_report as format_lds_report, holdout_split, report as lds_report
from attribution.fit_group import refuse_other_settings, write_row_copy
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
    """A worker's task. `store_url` is the store's normalised URL (`store.url`): a worker may run in another cwd."""
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


def fit_store(store_url: str, config: FitConfig = FitConfig(), address: str | None = None,
              workers: int = 1, prefix: str = "datamodels") -> dict:
    """Fit every missing target chunk of `prefix` and return the LDS summaries."""
    store = AttributionStore.open(store_url, "r+")
    blocks = store.completed_blocks()
    if not blocks:
        raise DmmError(f"store {store.url} has no completed subset models; run `dmm estimate` first")
    masks = store.read_masks(blocks)
    fit_rows, lds_rows = holdout_split(len(masks), config.holdout_models)
    rows = np.concatenate([np.arange(store.block_rows(b).start, store.block_rows(b).stop) for b in blocks])
    data = load_dataset(store.spec.dataset)
    check_fingerprint(data, store.fingerprint, f"store {store.url}")
    group_config = {**config.as_attrs(), "num_models": len(masks)}
    refuse_other_settings(store, prefix, {"target_chunk": config.targets_per_chunk,
                                          "row_chunk": config.rows_per_chunk, **group_config},
                          fix=f"rerun with the settings it was fitted with to resume, or delete {prefix}/ "
                              "(or fit a copy) to refit")
    group = store.create_fit_group(prefix, config.targets_per_chunk, config.rows_per_chunk, group_config)
    # dask chunks = one block × one target chunk: a task reads only its targets (the zarr chunk spans all points)
    logits = da.from_zarr(store.zarr_array("subsets/logits"),
                          chunks=(store.block_size, group.target_chunk, store.spec.num_classes))[rows]
    labels = data.all_labels().numpy()
    tasks = []
    for chunk in group.missing_chunks():
        sl = group.target_slice(chunk)
        tasks.append(dask.delayed(_fit_and_write)(
            store.url, prefix, chunk, masks[fit_rows], logits[fit_rows, sl], masks[lds_rows],
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
    write_row_copy(group, get, **kwargs)
    return {
        "models": len(masks), "fitting_models": fit_rows.stop - fit_rows.start,
        "holdout_models": config.holdout_models, "chunks_fitted": len(tasks),
        "lds": lds_report(group.lds[:], group.lds_margin[:], store.spec.n_train),
    }


def format_report(report: dict) -> list[str]:
    return [f"fitted {report['chunks_fitted']} target chunks on {report['fitting_models']} subset models; "
            f"LDS on {report['holdout_models']} held-out models:", *format_lds_report(report["lds"])]
