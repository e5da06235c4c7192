"""`dmm evaluate`: the evaluation DAG of an experiment spec, run on Ray, cached, and its report.

```
dataset ─┬─ originals (N seeds) ──────────────────────────────────────────────┐
         ├─ originals[amnesiac|sisa …] (N seeds, with records) ───────────────┤
         ├─ attribution (reuse or estimate + fit the store) ─ calibration ────┼─ method(F) per method ─ metrics(F) ─ report
         ├─ forget(F) ─┬─ oracles(F, N) ──────────────────────────────────────┤
         │             └─ floor(F, N): retrain, the 2nd oracle set ───────────┘
```
Seeds: the originals use seed + 0..N−1, the oracles seed + 10⁶ + 0..N−1, the floor (second,
independent oracle set, the `retrain` method) seed + 2·10⁶ + 0..N−1. The originals and oracles use
the store's model and recipe, so DM-Direct's datamodels describe them. OM matches the mean logits of
the floor set and is judged against the first oracle set. A training-time method (`amnesiac`, `sisa`)
unlearns its own originals, trained with the same seeds and its records (one `records` stage per
method and training-time hyperparameters, shared by the forget sets), and is judged against the same
oracles. Stage results are cached under `<out>/cache/` by content key (`cluster.dag`); the report is
rewritten every run.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from attribution.datasets import load_dataset
from attribution.deletion_scale import SCALES_FITTED_ON, resolve_class_models
from attribution.errors import DmmError
from attribution.fit_group import DELETION_SCALE
from attribution.models import require_consent
from attribution.recipes import Recipe, resolve_recipe
from attribution.store import AttributionStore

from .code_version import code_fingerprint, other_code, provenance
from .dag import Stage, is_done, run_dag, stage_code, stage_paths
from .eval_methods import base_method, method_needs, training_time
from .eval_plots import plot_klom_per_group, plot_klom_vs_cost, plot_margin_histograms
from .eval_report import result_row, write_margins, write_tables
from .eval_spec import AttributionSource, ExperimentSpec
from .eval_stages import STAGE_FUNCTIONS, groups_of, read_json
from .ray_runtime import connect

ORACLE_SEED_OFFSET, FLOOR_SEED_OFFSET = 1_000_000, 2_000_000
STAGE_FORMAT = 2  # part of every stage's key: bump it when a stage function writes other files or fields
HISTOGRAM_POINTS = 3


def _store_exists(url: str) -> bool:
    return os.path.exists(os.path.join(url, "zarr.json")) if "://" not in url else True


def store_state(store: AttributionStore, source: str) -> str:
    """sha256 over what DM-Direct reads of a reused store: its identity, the fit's settings and β0."""
    group = store.fit_group(source) if store.has_fit_group(source) else None
    h = hashlib.sha256(json.dumps(store.spec.to_attrs(), sort_keys=True).encode())
    if group is not None:  # c is the calibration stage's (it tracks its own settings), not the store's identity
        attrs = {k: v for k, v in group.attrs.items() if k != DELETION_SCALE}
        h.update(json.dumps(attrs, sort_keys=True, default=str).encode())
        h.update(np.asarray(group.done[:]).tobytes())
        h.update(np.asarray(group.bias[:]).tobytes())
    return h.hexdigest()


def _attribution_config(spec: ExperimentSpec, out: Path, data) -> dict:
    """The attribution stage's config; the store (if it exists) fixes the model and recipe."""
    from .estimate import EstimateRequest

    a = spec.attribution
    url = a.store or str((out / "store.zarr").resolve())
    config = {"url": url, "source": a.source, "dataset": data.name, "fingerprint": data.fingerprint,
              "num_models": a.num_models, "alpha": a.alpha, "seed": spec.seed, "block_size": a.block_size}
    if _store_exists(url):
        store = AttributionStore.open(url, "r")
        s = store.spec
        if s.dataset != data.name or (spec.model is not None and spec.model != s.model):
            raise DmmError(f"store {url} holds {s.dataset}/{s.model}, the spec asks for {data.name}/"
                           f"{spec.model or 'the default model'}; point attribution.store at a matching store")
        if spec.recipe is not None and resolve_recipe(s.dataset, s.model, spec.recipe) != Recipe.from_dict(s.recipe):
            raise DmmError(f"store {url} was trained with another recipe than {spec.recipe}; drop `recipe` "
                           "from the spec or point attribution.store at a store of that recipe")
        config.update(model=s.model, recipe=s.recipe)
        if a.num_models is None:
            config["state"] = store_state(store, a.source)
        else:
            config.update(alpha=s.alpha, seed=s.seed, block_size=s.block_size)
    elif a.num_models is None:
        raise DmmError(f"store {url} does not exist; give attribution.num_models to build it or point "
                       "attribution.store at an existing store")
    else:
        request = EstimateRequest.build(data.name, spec.model, spec.recipe)
        config.update(model=request.model, recipe=request.recipe.to_dict())
    return config


def calibration_config(a: AttributionSource, url: str) -> dict:
    """The calibration stage's config: M, α', K, K_c and the source (and that it measures the forget spread and fits the
    scales on margins: a cache from before either recalibrates); with M = 0 the store's record (read now), which it
    keeps."""
    config = {"source": a.source, "models": a.calibration_models, "alpha": a.calibration_alpha,
              "full_models": a.calibration_full_models, "forget_spread": True, "fitted_on": SCALES_FITTED_ON,
              "class_models": resolve_class_models(a.calibration_class_models, a.calibration_full_models)}
    if a.calibration_models == 0 and _store_exists(url):
        store = AttributionStore.open(url, "r")
        config["store_calibration"] = (store.fit_group(a.source).attrs.get(DELETION_SCALE)
                                       if store.has_fit_group(a.source) else None)
    return config


def experiment_stages(spec: ExperimentSpec, out: Path, trust_code: bool = False) -> tuple[list[Stage], dict]:
    """The DAG of the spec and the naming of its results: {(forget set, method): metrics stage name}.

    A `module:callable` model named by the spec or the store runs only with `trust_code` (issue 17).
    """
    data = load_dataset(spec.dataset)
    attribution = _attribution_config(spec, out, data)
    require_consent(attribution["model"], "the experiment spec or its store", trust_code)
    base = {"dataset": data.name, "fingerprint": data.fingerprint, "model": attribution["model"],
            "format": STAGE_FORMAT}
    train = {**base, "recipe": attribution["recipe"]}
    n = spec.models
    seeds = [spec.seed + i for i in range(n)]
    stages = [Stage("attribution", "attribution", attribution, num_cpus=0),
              Stage("originals", "population", {**train, "seeds": seeds})]
    records: dict[str, Stage] = {}  # the training-time methods' originals, one stage per (method, training)
    metrics_names = {}
    methods = dict(spec.methods)
    methods.setdefault("retrain", {})
    for fs in spec.forget_sets:
        forget_cfg = {**base, "spec": fs, "source": spec.attribution.source}
        if fs.startswith("ids:"):
            forget_cfg["ids_sha256"] = hashlib.sha256(Path(fs[4:]).read_bytes()).hexdigest() \
                if Path(fs[4:]).is_file() else None
        stages.append(Stage(f"forget[{fs}]", "forget", forget_cfg,
                            {"attribution": "attribution"} if fs.startswith("pc:") else {}))
        for name, offset, extra in (("oracles", ORACLE_SEED_OFFSET, {}),
                                    ("floor", FLOOR_SEED_OFFSET, {"time_one_retrain": True})):
            stages.append(Stage(f"{name}[{fs}]", "population",
                                {**train, **extra, "seeds": [spec.seed + offset + i for i in range(n)]},
                                {"forget": f"forget[{fs}]"}))
        for method, params in methods.items():
            originals = "originals"
            if method == "retrain":
                population = f"floor[{fs}]"
            else:
                population, kind = f"method[{fs}][{method}]", base_method(method)
                needs, training = method_needs(kind), training_time(kind, params)
                if training is not None:
                    originals = f"originals[{kind} {json.dumps(training, sort_keys=True)}]"
                    records[originals] = Stage(originals, "records",
                                               {**train, "method": kind, "training": training, "seeds": seeds})
                parents = {"originals": originals, "forget": f"forget[{fs}]"}
                if "store" in needs:
                    parents.update(attribution="attribution", calibration="calibration")
                if "oracles" in needs:
                    parents["floor"] = f"floor[{fs}]"
                stages.append(Stage(population, "method", {**base, "method": kind, "params": params,
                                                           "source": spec.attribution.source}, parents))
            name = f"metrics[{fs}][{method}]"
            stages.append(Stage(name, "metrics", {**base, "method": method, "seed": spec.seed,
                                                  "metrics": spec.metrics.__dict__},
                                {"population": population, "oracles": f"oracles[{fs}]", "originals": originals,
                                 "forget": f"forget[{fs}]", "floor": f"floor[{fs}]"}))
            metrics_names[(fs, method)] = name
    if any("calibration" in stage.parents for stage in stages):
        stages.append(Stage("calibration", "calibration", calibration_config(spec.attribution, attribution["url"]),
                            {"attribution": "attribution"}))
    return stages + list(records.values()), metrics_names


class PeakMemory:
    """Peak resident memory of this process and all its descendants (Ray's workers), sampled."""

    def __init__(self, interval: float = 0.5):
        import ray  # noqa: F401 - puts Ray's vendored psutil on sys.path
        import psutil

        self._root, self._psutil, self.peak = psutil.Process(), psutil, 0
        self._stop, self._interval = threading.Event(), interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for p in [self._root, *self._root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except self._psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def write_report(spec: ExperimentSpec, out: Path, paths: dict[str, Path], metrics_names: dict,
                 code: dict) -> list[dict]:
    """results.csv/json, margins/, report.md and the PNG plots in `out`; returns the result rows. `code`: the
    fingerprint that read the cache and the stages other code computed (`code_provenance`)."""
    from attribution.evaluation import margins
    import torch

    data = load_dataset(spec.dataset)
    labels = torch.as_tensor(data.all_labels())
    rows = []
    for fs in spec.forget_sets:
        forget = np.load(paths[f"forget[{fs}]"] / "ids.npy")
        groups = groups_of(forget, data.n_train, data.n_points)
        oracle = margins(torch.from_numpy(np.load(paths[f"oracles[{fs}]"] / "logits.npy")), labels).numpy()
        pops, kloms = {}, {}
        for (set_name, method), name in metrics_names.items():
            if set_name != fs:
                continue
            rows.append(result_row(fs, read_json(paths[name] / "metrics.json")))
            pops[method] = np.load(paths[name] / "margins.npy")
            kloms[method] = np.load(paths[name] / "klom.npy")
        write_margins(out, fs, {**{m: v for m, v in pops.items() if m != "retrain"}, "oracle": oracle,
                                "floor": pops["retrain"]}, groups)
        if fs == spec.forget_sets[0]:
            worst = forget[np.argsort(-kloms.get("nothing", next(iter(kloms.values())))[forget],
                                      kind="stable")[:HISTOGRAM_POINTS]]
            plot_margin_histograms(fs, oracle, pops, kloms, worst, out / "margin_histograms.png")
    write_tables(out, rows, spec.metrics.klom_direction, spec.models, code)
    plot_klom_per_group(rows, out / "klom_per_group.png", spec.metrics.klom_direction, spec.models)
    plot_klom_vs_cost(rows, out / "klom_vs_cost.png")
    return rows


def run_evaluation(spec: ExperimentSpec, out: str | os.PathLike, address: str | None = None,
                   progress: bool = True, trust_code: bool = False) -> dict:
    """Run (or resume) the spec's DAG and write its report into `out`; returns rows and timings."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with PeakMemory() as memory:
        stages, metrics_names = experiment_stages(spec, out, trust_code)
        connect(address)
        cached_before = sum(is_done(p) for p in stage_paths(stages, out / "cache").values())
        paths = run_dag(stages, STAGE_FUNCTIONS, out / "cache", progress=progress)
        code = code_provenance(paths)
        rows = write_report(spec, out, paths, metrics_names, code)
    return {"rows": rows, "stages": len(stages), "cached": cached_before, "seconds": time.perf_counter() - start,
            "peak_rss_bytes": memory.peak, "code": code}


def code_provenance(paths: dict[str, Path]) -> dict:
    """{"fingerprint": this process's code, "other": {stage: fingerprint} of the stages other code computed,
    "note": one sentence saying so} (`code_version`)."""
    current = code_fingerprint()
    others = other_code({name: stage_code(path) for name, path in paths.items()}, current)
    return {"fingerprint": current, "other": others, "note": provenance(current, others, len(paths))}

