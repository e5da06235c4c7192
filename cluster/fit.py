"""`dmm fit`: the datamodels of every target, chunk by chunk, out of core, with Dask.

The subset logits are a Dask array over the Zarr store (`from_zarr`); each task reads one chunk of
targets (all m fitting models × T points × k classes), solves its T·k regressions, measures their
LDS on the H held-out models and writes its own chunk of `datamodels/` (marker last). So memory grows
with T, not with the number of targets, and a rerun fits only chunks without a marker. Once every chunk
is done, the same scheduler writes β's row-major copy (`weight_rows`, for requests); a run on a complete
group without one (a store from before the copy existed) writes just that.

`FitConfig.targets` (`--targets`, :mod:`attribution.target_subset`) fits only a subset T of the points:
the chunks then run over β's |T| columns, and a task reads its targets' logits with one orthogonal-index
read of its (scattered) point ids. Through the sharded layout that read fetches every inner chunk holding
one of them: up to LOGITS_TARGET_CHUNK (256) × the task's share of the logits when T is sparse in the
points, though never more inner chunks than the task has targets.

What the chunks share is not recomputed per chunk: the masks reach the workers once (one `ray.put` on
Ray, one graph key otherwise) and one task builds the shared design (XᵀX, column sums, ‖G‖₂ of the
train and train + val rows, `lasso_stats.build_design`) that every chunk's task takes as its input.
`device` is where the solver runs (`cuda` on a GPU: the same torch code); on a Ray cluster each task
uses its node's GPU (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for tasks that ask for no GPU, so the
tasks of a node share its GPUs, as many at once as it has CPUs). `max_task_memory_gb` refuses, before
the store is touched, a fit whose task would need more (`attribution.fit_memory`: 34.7 GB at CIFAR-10
scale, 20 GB of it the shared Gram pair).

Schedulers: local threads by default; `--address` with a Ray cluster (or `RAY_ADDRESS`) runs the same
graph with Dask-on-Ray (`ray.util.dask.ray_dask_get`), `tcp://HOST:PORT` on a dask.distributed scheduler.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from attribution.datamodels import DEFAULT_VAL_FRACTION, fit_target_chunk, validation_split
from attribution.datasets import check_fingerprint, load_dataset
from attribution.device import resolve_device
from attribution.errors import DmmError
from attribution.fit_memory import check_task_memory
from attribution.lasso import DEFAULT_MAX_ITER, DEFAULT_PATH_LENGTH
from attribution.lasso_stats import build_design
from attribution.lds import DEFAULT_HOLDOUT, default_holdout, format_report as format_lds_report, holdout_split, \
    report as lds_report
from attribution.fit_group import create_fit_group, fit_group_attrs, recorded_settings, refuse_other_settings
from attribution.row_copy import write_row_copy
from attribution.store import AttributionStore
from attribution.target_subset import ALL, parse_targets

from .ray_runtime import cluster_address, connect


# The fit's solver tolerance (relative duality gap). Looser than the solver's own default (DEFAULT_TOL, 1e-5):
# a datamodel's error is its sampling error over m subset models, and at 1e-3 the LDS and the DM-Direct targets
# are those of 1e-5 to float rounding at a fraction of the time (README, "The fit's tolerance").
FIT_TOL = 1e-3


@dataclass(frozen=True)
class FitConfig:
    holdout_models: int = DEFAULT_HOLDOUT
    path_length: int = DEFAULT_PATH_LENGTH
    tol: float = FIT_TOL
    max_iter: int = DEFAULT_MAX_ITER
    targets_per_chunk: int = 256
    rows_per_chunk: int = 1
    val_fraction: float = DEFAULT_VAL_FRACTION
    device: str = "cpu"
    max_task_memory_gb: float | None = None
    targets: str = ALL  # the target spec: every point, or a subset (recorded as the group's `targets` attr)

    def __post_init__(self):
        if not (np.isfinite(self.tol) and self.tol > 0) or self.max_iter < 1:
            raise DmmError(f"solver tolerance {self.tol} / max iterations {self.max_iter} out of range; pass "
                           f"--tol > 0 and --max-iter >= 1 (defaults {FIT_TOL:g}, {DEFAULT_MAX_ITER})")

    def as_attrs(self) -> dict:
        """What fixes the fitted β (recorded in the group; a resume must match it). Not where it runs."""
        return {"holdout_models": self.holdout_models, "path_length": self.path_length,
                "val_fraction": self.val_fraction, "tol": self.tol, "max_iter": self.max_iter}


def resume_config(store_url: str, prefix: str = "datamodels") -> FitConfig:
    """The defaults, but the settings a store's existing `prefix` group was started with where it has one: how the
    demo and the evaluation fit, so that they finish or reuse a group fitted under other settings (an earlier
    default tolerance, a `dmm fit --path-length`) instead of refusing it. Explicit `dmm fit` flags are still checked.
    A new group holds out `default_holdout` of the store's models (a small store's demo or evaluation fits too)."""
    store = AttributionStore.open(store_url)
    attrs = fit_group_attrs(store, prefix)
    if attrs is None:
        return FitConfig(holdout_models=default_holdout(store.completed_models()))
    kept = recorded_settings(attrs)
    return FitConfig(targets_per_chunk=kept["target_chunk"], rows_per_chunk=kept["row_chunk"],
                     **{k: kept[k] for k in FitConfig().as_attrs() if k in kept})


@dataclass(frozen=True)
class _Scheduler:
    get: object  # a dask scheduler name or `get`
    kwargs: dict
    on_ray: bool = False

    def share(self, value, name: str):
        """`value` as a task argument that reaches the workers once: one `ray.put` on Ray (Dask-on-Ray resolves
        the reference in each task), else one graph key its tasks depend on."""
        if self.on_ray:
            import ray

            return ray.put(value)
        import dask

        return dask.delayed(value, name=name)


def _scheduler(address: str | None, workers: int) -> _Scheduler:
    """Threads, Dask-on-Ray or dask.distributed."""
    if address and address.startswith("tcp://"):
        try:
            from distributed import Client
        except ImportError:
            raise DmmError("a tcp:// address needs dask.distributed; pip install distributed") from None
        return _Scheduler(Client(address).get, {})
    if cluster_address(address):
        connect(address)
        try:
            from ray.util.dask import ray_dask_get
        except ImportError as e:
            raise DmmError(f"Dask-on-Ray cannot be imported ({e}); pip install pandas pyarrow") from None
        return _Scheduler(ray_dask_get, {}, on_ray=True)
    return _Scheduler("threads", {"num_workers": workers})


def _design(masks, fit_rows: slice, config: FitConfig):
    """A worker's task, once per fit: the design shared by every chunk (the fitting models' train/val split)."""
    train, val = validation_split(fit_rows.stop - fit_rows.start, config.val_fraction)
    fit = masks[fit_rows]
    return build_design(fit[train], fit[val], device=resolve_device(config.device))


def _fit_and_write(store_url, prefix, chunk, masks, design, splits, logits_fit, logits_lds, labels, config):
    """A worker's task. `store_url` is the store's normalised URL (`store.url`): a worker may run in another cwd.
    `splits` = (fitting rows, held-out rows) of `masks`. Returns (regressions, of them stopped at max_iter): the
    driver says once how many stopped, where a warning per task would break the progress bar."""
    fit_rows, lds_rows = splits
    fit = fit_target_chunk(masks[fit_rows], logits_fit, masks[lds_rows], logits_lds, labels,
                           path_length=config.path_length, val_fraction=config.val_fraction,
                           tol=config.tol, max_iter=config.max_iter, design=design,
                           device=resolve_device(config.device), warn=False)
    group = AttributionStore.open(store_url, "r+").fit_group(prefix)
    group.write_chunk(chunk, fit.weight, fit.bias, fit.lam, fit.lds, fit.lds_margin)
    return fit.lam.size, fit.at_max_iter


def _target_logits(store_url, rows: np.ndarray, points: np.ndarray) -> np.ndarray:
    """A worker's task: the logits (rows × t × k) of a subset chunk's targets, one orthogonal-index read."""
    return AttributionStore.open(store_url).zarr_array("subsets/logits").oindex[rows, points, :]


def chunk_bar(total: int, initial: int) -> tqdm:
    """The fit's progress bar. Its rate and ETA are the run's average (smoothing 0): the watcher redraws it every
    0.5 s while chunks take minutes, and tqdm's smoothed rate would time a chunk from the last redraw."""
    return tqdm(total=total, initial=initial, unit="chunk", desc="fit", smoothing=0)


def _watch(group, total: int, stop: threading.Event) -> None:
    """Progress bar over target chunks, read from the store's markers (works with any scheduler)."""
    with chunk_bar(total, len(group.completed_chunks())) as bar:
        while not stop.wait(0.5):
            bar.update(len(group.completed_chunks()) - bar.n)
        bar.update(len(group.completed_chunks()) - bar.n)


def fit_store(store_url: str, config: FitConfig = FitConfig(), address: str | None = None,
              workers: int = 1, prefix: str = "datamodels") -> dict:
    """Fit every missing target chunk of `prefix` and return the LDS summaries."""
    import dask  # here, not at import: Dask is half a second of every `dmm` command's start
    import dask.array as da

    store = AttributionStore.open(store_url)
    targets = parse_targets(config.targets, store.spec.n_points)
    blocks = store.completed_blocks()
    if not blocks:
        raise DmmError(f"store {store.url} has no completed subset models; run `dmm estimate` first")
    masks = store.read_masks(blocks)
    fit_rows, lds_rows = holdout_split(len(masks), config.holdout_models)
    train, val = validation_split(fit_rows.stop - fit_rows.start, config.val_fraction)
    spec = store.spec
    check_task_memory(config.max_task_memory_gb, n=spec.n_train,
                      points=min(config.targets_per_chunk, targets.count(spec.n_points)),
                      k=spec.num_classes, m_train=train.stop - train.start, m_val=val.stop - val.start)
    scheduler = _scheduler(address, workers)
    if not scheduler.on_ray:
        resolve_device(config.device)  # on a cluster the workers' GPUs count, not this machine's
    store = AttributionStore.open(store_url, "r+")
    rows = np.concatenate([np.arange(store.block_rows(b).start, store.block_rows(b).stop) for b in blocks])
    data = load_dataset(store.spec.dataset)
    check_fingerprint(data, store.fingerprint, f"store {store.url}")
    group_config = {**config.as_attrs(), "num_models": len(masks)}
    refuse_other_settings(store, prefix, {"target_chunk": config.targets_per_chunk,
                                          "row_chunk": config.rows_per_chunk, **group_config},
                          fix=f"rerun with the settings it was fitted with to resume, or delete {prefix}/ "
                              "(or fit a copy) to refit", targets=targets)
    group = create_fit_group(store, prefix, config.targets_per_chunk, config.rows_per_chunk, group_config,
                             targets=targets)
    # dask chunks = one block × one target chunk: a task reads only its targets (the zarr chunk spans all points)
    logits = da.from_zarr(store.zarr_array("subsets/logits"),
                          chunks=(store.block_size, group.target_chunk, store.spec.num_classes))[rows]
    labels = data.all_labels().numpy()
    missing = group.missing_chunks()
    if missing:
        shared = scheduler.share(masks, "fit-masks")
        design = dask.delayed(_design)(shared, fit_rows, config, dask_key_name="fit-design")
    tasks = []
    for chunk in missing:
        points = group.chunk_points(chunk)
        if targets.is_subset:
            chunk_logits = dask.delayed(_target_logits)(store.url, rows, points, dask_key_name=f"fit-logits-{chunk}")
        else:
            chunk_logits = logits[:, points]
        tasks.append(dask.delayed(_fit_and_write)(
            store.url, prefix, chunk, shared, design, (fit_rows, lds_rows), chunk_logits[fit_rows],
            chunk_logits[lds_rows], labels[points], config, dask_key_name=f"fit-chunk-{chunk}"))
    get, kwargs = scheduler.get, scheduler.kwargs
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(group, group.num_chunks, stop), daemon=True)
    watcher.start()
    try:
        counts = dask.compute(*tasks, scheduler=get, **kwargs)
    finally:
        stop.set()
        watcher.join()
    write_row_copy(group, get, **kwargs)
    return {
        "models": len(masks), "fitting_models": fit_rows.stop - fit_rows.start,
        "holdout_models": config.holdout_models, "chunks_fitted": len(tasks),
        "targets": targets.spec, "fitted_targets": group.num_targets,
        "regressions": sum(c[0] for c in counts), "at_max_iter": sum(c[1] for c in counts),
        "max_iter": config.max_iter, "tol": config.tol,
        "lds": lds_report(group.lds[:], group.lds_margin[:], targets.train_count(store.spec.n_train)),
    }


def format_report(report: dict) -> list[str]:
    subset = "" if report["targets"] == ALL else f" of {report['fitted_targets']} targets ({report['targets']})"
    stopped = report["at_max_iter"]
    cut_short = [f"{stopped:,} of its {report['regressions']:,} regressions stopped at --max-iter "
                 f"{report['max_iter']} before the duality gap reached --tol {report['tol']:g} (their β is "
                 f"less exact; raise --max-iter or loosen --tol)"] if stopped else []
    return [f"fitted {report['chunks_fitted']} target chunks{subset} on {report['fitting_models']} subset models; "
            f"LDS on {report['holdout_models']} held-out models:", *format_lds_report(report["lds"]), *cut_short]
