"""A scaling model measured here (issue 16 point 4): synthetic stores at n ∈ {2k, 8k, 32k}, p = 1.2 n, k = 10.

No training: every store holds MODELS subset models of random α = 0.5 masks and N(0, 1) logits, written
block by block with `AttributionStore.write_block`, and the rows of β that the requests below read —
datamodels sparse (DENSITY = 9 % non-zero, as measured on digits), TRAK dense — in a complete
`weight_rows` copy (β whole is n·p·k·4 bytes, 49 GB at n = 32k: never written). For each n it measures

* estimate writes: models/s and MB/s (masks + logits as handed to `write_block`) and the bytes stored;
* one fit task, in a fresh process (its peak RSS is that process's VmHWM): read the masks and the logits of
  one default target chunk (`FitConfig.targets_per_chunk`) through a counting store — its read amplification
  is the stored bytes read over the stored bytes of its share (the masks + its targets' fraction of the
  logits) — then the shared design (`lasso_stats.build_design`, once per store snapshot) and the real
  solver (`datamodels.fit_target_chunk`) on `--solve-targets` of those targets with a 2-point λ path and
  `--max-iter` FISTA iterations. Skipped where `fit_memory.task_bytes` exceeds `--fit-memory-gb`;
* requests: DM-Direct's Σ_{i∈F} β_i (`matching.direct.forget_effect`) for |F| ∈ FORGET_SIZES, median of
  --repeats, and, through a counting store, the stored objects and bytes it reads (objects per forget id).

Then the growth exponent of each quantity vs n (log-log least squares over the sizes measured).
Default run (3 sizes, m = 512 models, 8 solved targets) takes about 5 minutes on 2 idle cores and 9 GB
at n = 32k (the fit's shared design is 2·n²·4 bytes); `--sizes 2000 4000` is a quick run.

Run: python benchmarks/bench_scale.py [--sizes 2000 8000 32000] [--solve-targets 8] [--fit-memory-gb 12]
Prints a summary per size, then one JSON line last.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore, WrapperStore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attribution.datamodels import DEFAULT_VAL_FRACTION, fit_target_chunk, validation_split  # noqa: E402
from attribution.row_copy import ROW_CODECS, ROWS  # noqa: E402
from attribution.fit_memory import task_bytes  # noqa: E402
from attribution.lasso_stats import build_design  # noqa: E402
from attribution.lds import holdout_split  # noqa: E402
from attribution.store import AttributionStore, StoreSpec  # noqa: E402
from attribution.store_zarr import ARRAY_CONFIG, COMPRESSORS, array_attrs  # noqa: E402
from cluster.fit import FitConfig  # noqa: E402
from matching.direct import fitted_group, forget_effect  # noqa: E402

K = 10
P_RATIO = 1.2
BLOCK_SIZE = 64
MODELS = 512  # subset models per store: fixed (2·n would be 98 GB of logits at n = 32k)
HOLDOUT = 32  # of them held out for the LDS, as `dmm fit --holdout-models`
FORGET_SIZES = (10, 100, 1000)
DENSITY = 0.09  # datamodels β non-zero fraction at the chosen λ, measured on digits (issue 16)
TARGET_CHUNK = FitConfig().targets_per_chunk
SIZES = (2000, 8000, 32000)


class CountingStore(WrapperStore):
    """A zarr store that records (key, bytes) of every read that returns data; ``reads`` is shared by copies."""

    def __init__(self, store, reads: list | None = None) -> None:
        super().__init__(store)
        self.reads: list[tuple[str, int]] = [] if reads is None else reads

    def _with_store(self, store):
        return type(self)(store, self.reads)

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is not None:
            self.reads.append((key, len(buf)))
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        self.reads += [(key, len(b)) for (key, _), b in zip(key_ranges, bufs) if b is not None]
        return bufs

    def data_reads(self) -> tuple[int, int]:
        """(distinct stored objects, bytes) read since the last ``reads.clear()``, metadata (zarr.json) left out."""
        data = [(k, b) for k, b in self.reads if not k.endswith("zarr.json")]
        return len({k for k, _ in data}), sum(b for _, b in data)


def counted_store(url: str) -> tuple[AttributionStore, CountingStore]:
    """The store at ``url`` opened read-only through a :class:`CountingStore` (a local path only)."""
    counter = CountingStore(LocalStore(url, read_only=True))
    return AttributionStore(url, zarr.open_group(counter, mode="r", zarr_format=3), "r"), counter


def stored_bytes(url: str, path: str) -> int:
    """Bytes of the objects stored under ``path`` of a local store (metadata left out)."""
    return sum(f.stat().st_size for f in (Path(url) / path).rglob("*") if f.is_file() and f.name != "zarr.json")


def points(n: int) -> int:
    return round(P_RATIO * n)


def build_store(url: str, n: int, models: int, seed: int = 0) -> dict:
    """A store of ``models`` synthetic subset models; returns the write throughput (only ``write_block`` timed)."""
    p = points(n)
    spec = StoreSpec(dataset="synthetic", fingerprint=hashlib.sha256(f"synthetic:{n}:{p}".encode()).hexdigest(),
                     model="synthetic", recipe={"synthetic": True}, alpha=0.5, seed=seed, block_size=BLOCK_SIZE,
                     n_train=n, n_points=p, num_classes=K)
    store = AttributionStore.open_or_create(url, spec, models)
    rng = np.random.default_rng(seed)
    seconds = 0.0
    for block in store.missing_blocks():
        masks = rng.random((BLOCK_SIZE, n)) < 0.5
        logits = rng.standard_normal((BLOCK_SIZE, p, K), dtype=np.float32)
        start = time.perf_counter()
        store.write_block(block, masks, logits)
        seconds += time.perf_counter() - start
    raw = models * (n + p * K * 4)
    return {"write_models_per_s": models / seconds, "write_mb_per_s": raw / seconds / 1e6, "write_s": seconds,
            "stored_mb": (stored_bytes(url, "subsets/masks") + stored_bytes(url, "subsets/logits")) / 1e6}


def write_beta_rows(url: str, prefix: str, rows: np.ndarray, density: float, seed: int = 0) -> None:
    """A ``prefix`` fit group whose complete ``weight_rows`` copy holds random β rows ``rows`` (the rest absent = 0)."""
    store = AttributionStore.open(url, "r+")
    n, p = store.spec.n_train, store.spec.n_points
    store.create_fit_group(prefix, TARGET_CHUNK, 1, {"synthetic": True})
    arr = store.group.create_array(
        f"{prefix}/{ROWS}", shape=(n, p, K), chunks=(1, p, K), dtype="float32", fill_value=0.0,
        compressors=COMPRESSORS, config=ARRAY_CONFIG, overwrite=True,
        attributes=array_attrs(store.fingerprint, "synthetic β rows", complete=False))
    if tuple(arr.metadata.codecs) != ROW_CODECS:
        raise SystemExit(f"{prefix}/{ROWS} has codecs {arr.metadata.codecs}, requests expect {ROW_CODECS}; "
                         "fix: update this benchmark to the row copy's layout")
    rng = np.random.default_rng(seed)
    for i in rows:
        row = rng.standard_normal((p, K), dtype=np.float32)
        arr[int(i)] = np.where(rng.random((p, K)) < density, row, np.float32(0)) if density < 1 else row  # +0.0
    arr.attrs.update({"complete": True})


def measure_requests(url: str, prefix: str, forgets: list[np.ndarray], repeats: int) -> list[dict]:
    """Per forget set: median seconds of Σ_{i∈F} β_i (group opened each time, as a request does), and the
    stored objects and bytes it reads, counted through a :class:`CountingStore`."""
    store = AttributionStore.open(url)
    cstore, counter = counted_store(url)
    out = []
    for forget in forgets:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forget_effect(fitted_group(store, prefix), forget)
            times.append(time.perf_counter() - start)
        counter.reads.clear()
        forget_effect(fitted_group(cstore, prefix), forget)
        objects, nbytes = counter.data_reads()
        out.append({"forget": len(forget), "request_s": float(np.median(times)), "objects": objects,
                    "mb_read": nbytes / 1e6, "objects_per_forget_row": objects / len(forget)})
    return out


def _vm_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def fit_task(url: str, solve_targets: int, max_iter: int) -> dict:
    """One fit task on chunk 0: counted read of the masks and its targets' logits, the shared design, the solve."""
    baseline_mb = _vm_kb("VmRSS") / 1024
    store, counter = counted_store(url)
    blocks = store.completed_blocks()
    p = store.spec.n_points
    chunk = slice(0, min(TARGET_CHUNK, p))
    counter.reads.clear()
    start = time.perf_counter()
    masks = store.read_masks(blocks)
    logits = store.read_logits(blocks, targets=chunk)
    read_s = time.perf_counter() - start
    _, read_bytes = counter.data_reads()
    share = stored_bytes(url, "subsets/masks") + stored_bytes(url, "subsets/logits") * (chunk.stop / p)
    fit_rows, lds_rows = holdout_split(len(masks), HOLDOUT)
    train, val = validation_split(fit_rows.stop - fit_rows.start, DEFAULT_VAL_FRACTION)
    X = masks[fit_rows]
    start = time.perf_counter()
    design = build_design(X[train], X[val])
    design_s = time.perf_counter() - start
    solved = slice(0, min(solve_targets, chunk.stop))
    start = time.perf_counter()
    with warnings.catch_warnings():  # --max-iter stops FISTA early on purpose: this times the work, not β
        warnings.filterwarnings("ignore", message="lasso: .* hit max_iter")
        fit_target_chunk(X, logits[fit_rows, solved], masks[lds_rows], logits[lds_rows, solved],
                         np.zeros(solved.stop, dtype=np.int64), path_length=2, max_iter=max_iter, design=design)
    solve_s = time.perf_counter() - start
    return {"fit_read_s": read_s, "fit_read_mb": read_bytes / 1e6, "fit_share_mb": share / 1e6,
            "fit_read_amplification": read_bytes / share, "design_s": design_s, "solve_s": solve_s,
            "solved_targets": solved.stop, "fit_peak_rss_mb": _vm_kb("VmHWM") / 1024, "fit_baseline_rss_mb": baseline_mb}


def fit_task_isolated(url: str, solve_targets: int, max_iter: int) -> dict:
    """:func:`fit_task` in a fresh process, so that its VmHWM is the task's own peak."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, "--fit-task", url, "--solve-targets", str(solve_targets),
                           "--max-iter", str(max_iter)], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the fit task on {url} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_task_gb(n: int, models: int, solve_targets: int) -> float:
    """A fit task's memory by `fit_memory.task_bytes`, plus its chunk of float32 logits."""
    fitting = models - HOLDOUT
    train, val = validation_split(fitting, DEFAULT_VAL_FRACTION)
    m_train, m_val = train.stop - train.start, val.stop - val.start
    return (task_bytes(n, solve_targets * K, m_train, m_val) + models * TARGET_CHUNK * K * 4) / 1e9


def measure_size(base: Path, n: int, *, models: int, solve_targets: int, max_iter: int, repeats: int,
                 fit_memory_gb: float, isolate: bool = True, seed: int = 0) -> dict:
    """Everything measured at one n (the store is deleted afterwards)."""
    url = str(base / f"n{n}.zarr")
    row = {"n": n, "p": points(n), "k": K, "models": models, **build_store(url, n, models, seed)}
    need = fit_task_gb(n, models, solve_targets)
    if need <= fit_memory_gb:
        row.update((fit_task_isolated if isolate else fit_task)(url, solve_targets, max_iter))
    else:
        print(f"  n = {n}: fit task skipped, it needs {need:.1f} GB > --fit-memory-gb {fit_memory_gb:g}", flush=True)
    order = np.random.default_rng(seed + 1).permutation(n)
    forgets = [np.sort(order[:f]) for f in FORGET_SIZES if f <= n]
    for prefix, density in (("datamodels", DENSITY), ("trak", 1.0)):
        write_beta_rows(url, prefix, forgets[-1], density, seed)
        row[prefix] = measure_requests(url, prefix, forgets, repeats)
    shutil.rmtree(url, ignore_errors=True)
    return row


def exponent(ns, values) -> float | None:
    """Slope of log(value) vs log(n) by least squares; None with fewer than 2 positive finite values."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if v is not None and v > 0 and math.isfinite(v)]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    x, y = np.array(pts).T
    return round(float(np.polyfit(x, y, 1)[0]), 3)


SCALAR_KEYS = ("write_models_per_s", "write_mb_per_s", "stored_mb", "fit_read_s", "fit_read_mb",
               "fit_read_amplification", "design_s", "solve_s", "fit_peak_rss_mb")


def summarize(rows: list[dict]) -> dict:
    """The JSON summary: per-size rows, the exponents of every quantity vs n, the worst objects per forget id."""
    ns = [r["n"] for r in rows]
    exps = {key: exponent(ns, [r.get(key) for r in rows]) for key in SCALAR_KEYS}
    for prefix in ("datamodels", "trak"):
        for f in FORGET_SIZES:
            reqs = [next((q for q in r[prefix] if q["forget"] == f), {}) for r in rows]
            exps[f"{prefix}_request_s_F{f}"] = exponent(ns, [q.get("request_s") for q in reqs])
            exps[f"{prefix}_request_mb_F{f}"] = exponent(ns, [q.get("mb_read") for q in reqs])
    amps = [r["fit_read_amplification"] for r in rows if "fit_read_amplification" in r]
    return {
        "bench": "scale", "sizes": ns, "models": rows[0]["models"], "target_chunk": TARGET_CHUNK,
        "beta_density": DENSITY, "rows": _rounded(rows), "exponents": exps,
        "objects_per_forget_row": max(q["objects_per_forget_row"] for r in rows
                                      for prefix in ("datamodels", "trak") for q in r[prefix]),
        "fit_read_amplification": max(amps) if amps else None,
    }


def _rounded(value):
    """``value`` with every float rounded to 4 significant digits (for the JSON line)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def print_row(r: dict) -> None:
    fit = (f"fit task: read {r['fit_read_mb']:.1f} MB in {r['fit_read_s']:.2f} s (amplification "
           f"{r['fit_read_amplification']:.1f}), design {r['design_s']:.1f} s, solve of {r['solved_targets']} "
           f"targets {r['solve_s']:.1f} s, peak RSS {r['fit_peak_rss_mb']:.0f} MB"
           if "design_s" in r else "fit task: skipped")
    print(f"n = {r['n']}, p = {r['p']}, {r['models']} models: writes {r['write_models_per_s']:.1f} models/s, "
          f"{r['write_mb_per_s']:.0f} MB/s ({r['stored_mb']:.0f} MB stored); {fit}", flush=True)
    for prefix in ("datamodels", "trak"):
        print(f"  {prefix} requests: " + "; ".join(
            f"|F| = {q['forget']}: {q['request_s'] * 1e3:.1f} ms, {q['objects']} objects, {q['mb_read']:.1f} MB"
            for q in r[prefix]), flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="n_train values (p = 1.2 n)")
    parser.add_argument("--models", type=int, default=MODELS, help=f"subset models (a multiple of {BLOCK_SIZE})")
    parser.add_argument("--solve-targets", type=int, default=8, help="targets the fit task solves (of its chunk)")
    parser.add_argument("--max-iter", type=int, default=5, help="FISTA iterations per λ of the fit task")
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per |F|; the median is reported")
    parser.add_argument("--fit-memory-gb", type=float, default=12.0, help="skip fit tasks predicted to need more")
    parser.add_argument("--fit-task", help=argparse.SUPPRESS)  # internal: run one fit task on this store
    args = parser.parse_args(argv)
    if args.fit_task:
        print(json.dumps(fit_task(args.fit_task, args.solve_targets, args.max_iter)))
        return {}
    if args.models % BLOCK_SIZE or args.models < 2 * HOLDOUT or min(args.sizes) < 2:
        parser.error(f"--models must be a multiple of {BLOCK_SIZE} and ≥ {2 * HOLDOUT}; --sizes ≥ 2")
    base = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = []
    try:
        for n in sorted(args.sizes):
            rows.append(measure_size(base, n, models=args.models, solve_targets=args.solve_targets,
                                     max_iter=args.max_iter, repeats=args.repeats, fit_memory_gb=args.fit_memory_gb))
            print_row(rows[-1])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    summary = summarize(rows)
    print("growth exponents vs n: " + ", ".join(f"{k} {v}" for k, v in summary["exponents"].items() if v is not None))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
