"""Benchmark: `dmm fit` is out of core — peak RSS stays flat when the number of targets grows 8×.

    python benchmarks/bench_fit_memory.py [--n-train N] [--models M] [--points P] [--growth G]
                                          [--targets-per-chunk T] [--path-length L] [--threads J]

1. Two synthetic stores (no training) with the same n_train N and M subset models: random α = 0.5
   0/1 masks and logits y = b + X β + noise with a sparse β per (point, class), written block by
   block with `AttributionStore.write_block`. The dataset is a random npz (only its labels and
   fingerprint matter to the fit); the small store has P target points (N train + P − N held-out),
   the large one G·P (N train + G·P − N held-out). Targets include the train points, so P > N.
   The stores are built in a subprocess: a child's ru_maxrss starts from its parent's RSS at fork,
   so the measuring process itself stays small (numpy only).
2. `dmm fit --store S --holdout-models H --path-length L --targets-per-chunk T` runs on each in a
   fresh subprocess (`python -m cluster.cli`, local threads); its peak RSS is `ru_maxrss` from
   `os.wait4`. A third subprocess that imports the CLI and exits gives the baseline RSS.
3. Pass: ratio = peak_large / peak_small ≤ 1.2, while the large store's weight matrix
   (N × G·P × k float32, `weight_mb_large`) would be far beyond that if it were held in memory.

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BLOCK_SIZE = 100
K = 10


def build_store(base: Path, name: str, n_train: int, n_points: int, models: int, seed: int = 0) -> str:
    """A store with `models` synthetic subset models over an npz dataset of n_train + (n_points − n_train) points."""
    from attribution.datasets import load_dataset
    from attribution.store import AttributionStore, StoreSpec

    rng = np.random.default_rng(seed)
    n_test = n_points - n_train
    npz = base / f"{name}.npz"
    np.savez(npz, x_train=rng.standard_normal((n_train, 4)).astype(np.float32),
             y_train=rng.integers(0, K, n_train), x_test=rng.standard_normal((n_test, 4)).astype(np.float32),
             y_test=rng.integers(0, K, n_test))
    data = load_dataset(f"npz:{npz}")
    spec = StoreSpec(dataset=data.name, fingerprint=data.fingerprint, model="mlp", recipe={"synthetic": True},
                     alpha=0.5, seed=seed, block_size=BLOCK_SIZE, n_train=n_train, n_points=n_points,
                     num_classes=K)
    url = str(base / f"{name}.zarr")
    store = AttributionStore.open_or_create(url, spec, models)
    # sparse β: ~8 influential train points per (point, class), heavy-ish tails; bias ~ N(0, 2²)
    beta = (rng.standard_normal((n_train, n_points * K)) * (rng.random((n_train, n_points * K)) < 8 / n_train))
    beta = beta.astype(np.float32)
    bias = (2.0 * rng.standard_normal(n_points * K)).astype(np.float32)
    for block in store.missing_blocks():
        masks = rng.random((BLOCK_SIZE, n_train)) < 0.5
        logits = bias + masks.astype(np.float32) @ beta + rng.standard_normal((BLOCK_SIZE, n_points * K), np.float32)
        store.write_block(block, masks, logits.reshape(BLOCK_SIZE, n_points, K))
    return url


def run_peak_rss(args: list[str], env: dict) -> tuple[float, float, str]:
    """(peak RSS MB, wall s, stdout) of one fresh `python -m cluster.cli ARGS` (or `python -c …`) process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited with {proc.returncode}:\n{out}")
    return usage.ru_maxrss / 1024.0, time.perf_counter() - t0, out  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--models", type=int, default=300, help="subset models (multiple of 100)")
    p.add_argument("--holdout-models", type=int, default=50)
    p.add_argument("--points", type=int, default=512, help="target points of the small store (> n_train)")
    p.add_argument("--growth", type=int, default=8)
    p.add_argument("--targets-per-chunk", type=int, default=128)
    p.add_argument("--path-length", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads of the fit subprocesses")
    p.add_argument("--keep", help="build the stores under this folder and keep them")
    p.add_argument("--build-only", help=argparse.SUPPRESS)  # internal: build the two stores in this folder
    a = p.parse_args()
    if a.points <= a.n_train or a.models % BLOCK_SIZE:
        p.error("--points must be > --n-train (targets are the train points, then at least one held-out); --models a multiple of 100")

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)  # local threads, never a cluster
    if not a.build_only:
        base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-fit-memory-"))
        base.mkdir(parents=True, exist_ok=True)
    sizes = {"small": a.points, "large": a.growth * a.points}
    if a.build_only:
        for name, n_points in sizes.items():
            t0 = time.perf_counter()
            Path(a.build_only).mkdir(parents=True, exist_ok=True)
            build_store(Path(a.build_only), name, a.n_train, n_points, a.models)
            print(f"built {name}: n_train {a.n_train}, {n_points} targets, {a.models} models "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
        return
    try:
        build = [sys.argv[0], *sys.argv[1:], "--build-only", str(base)]
        subprocess.run([sys.executable, *build], cwd=ROOT, env=env, check=True)
        urls = {name: str(base / f"{name}.zarr") for name in sizes}
        results = {}
        baseline, _, _ = run_peak_rss(["-c", "import cluster.cli, cluster.fit"], env)
        for name in sizes:
            rss, wall, out = run_peak_rss(
                ["-m", "cluster.cli", "fit", "--store", urls[name], "--holdout-models", str(a.holdout_models),
                 "--path-length", str(a.path_length), "--targets-per-chunk", str(a.targets_per_chunk)], env)
            margin = next((ln.strip() for ln in out.splitlines() if "held-out points, margin" in ln), "")
            results[name] = (rss, wall)
            print(f"fit {name}: {sizes[name]} targets, peak RSS {rss:.0f} MB, {wall:.1f}s | {margin}", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)

    (small, t_small), (large, t_large) = results["small"], results["large"]
    weight_mb = a.n_train * sizes["large"] * K * 4 / 2**20
    chunk_mb = a.n_train * a.targets_per_chunk * K * 4 / 2**20
    ratio = large / small
    print(f"baseline (imports only) {baseline:.0f} MB; large store's weight matrix {weight_mb:.0f} MB, "
          f"one chunk {chunk_mb:.1f} MB; ratio {ratio:.3f} ({'PASS' if ratio <= 1.2 else 'FAIL'} ≤ 1.2)")
    print(json.dumps({
        "bench": "fit_memory", "n_train": a.n_train, "models": a.models, "targets_per_chunk": a.targets_per_chunk,
        "targets_small": sizes["small"], "targets_large": sizes["large"],
        "peak_rss_small_mb": round(small, 1), "peak_rss_large_mb": round(large, 1),
        "baseline_rss_mb": round(baseline, 1), "weight_mb_large": round(weight_mb, 1),
        "fit_s_small": round(t_small, 1), "fit_s_large": round(t_large, 1), "ratio": round(ratio, 3),
    }))


if __name__ == "__main__":
    main()
