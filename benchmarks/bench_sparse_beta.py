"""Sparse β rows vs the row copy's zstd-compressed dense rows (issue 16 points 2 and 5): bytes and sum time.

An L1 datamodel row β_{i,·,·} is mostly zeros. The store keeps it dense (p·k float32) behind zstd
(`attribution.row_copy.ROW_CODECS`); the alternative is a sparse row: the non-zeros' flat indices,
delta-coded (uint32), and their values, each zstd-compressed with the same level. For rows of
p·k = `--entries` entries at each density in `--densities` (uniform positions, N(0, 10⁻⁶) values, as
`bench_scale`'s synthetic β), and for `--rows` real rows of a store's `datamodels/weight_rows` when
`--store` names one, it measures

* stored bytes of both forms (their ratio is what a request reads, and what the copy stores);
* DM-Direct's Σ_{i∈F} β_i over the same rows both ways, in one process: decode + dense add of each row,
  against decode + cumulative sum of the deltas + scatter-add of the values (the same float64 sums).

Run: python benchmarks/bench_sparse_beta.py [--store demo_out/store.zarr] [--entries 384000]
Prints one line per density, then one JSON line last: {"bench": "sparse_beta", "per_density": ...,
"max_bytes_ratio": ..., "min_bytes_ratio": ...} (sparse bytes over dense bytes; < 1: sparse is smaller).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from numcodecs import Zstd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attribution.store_zarr import COMPRESSORS  # noqa: E402

ZSTD = Zstd(level=COMPRESSORS[0].level)


def synthetic_rows(entries: int, density: float, rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    beta = rng.normal(0, 1e-3, size=(rows, entries)).astype("<f4")
    return np.where(rng.random((rows, entries)) < density, beta, np.float32(0))  # +0.0, as the fit writes


def encode_dense(row: np.ndarray) -> bytes:
    return ZSTD.encode(np.ascontiguousarray(row, dtype="<f4"))


def encode_sparse(row: np.ndarray) -> tuple[bytes, bytes]:
    """(delta-coded flat indices of the non-zeros, their values), each zstd-compressed."""
    nz = np.flatnonzero(row)
    deltas = np.diff(nz, prepend=0).astype("<u4")
    return ZSTD.encode(deltas), ZSTD.encode(row.ravel()[nz].astype("<f4"))


def sum_dense(encoded: list[bytes], entries: int) -> np.ndarray:
    total, row = np.zeros(entries, dtype=np.float64), np.empty(entries, dtype="<f4")
    for raw in encoded:
        ZSTD.decode(raw, out=row)
        total += row
    return total


def sum_sparse(encoded: list[tuple[bytes, bytes]], entries: int) -> np.ndarray:
    total = np.zeros(entries, dtype=np.float64)
    for deltas, values in encoded:
        idx = np.cumsum(np.frombuffer(ZSTD.decode(deltas), dtype="<u4"), dtype=np.int64)
        total[idx] += np.frombuffer(ZSTD.decode(values), dtype="<f4")  # indices are unique within a row
    return total


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def compare(rows: np.ndarray, repeats: int) -> dict:
    """Bytes and sum time of the rows (r × entries) in both forms; the sums must agree."""
    entries = rows.shape[1]
    dense = [encode_dense(r) for r in rows]
    sparse = [encode_sparse(r) for r in rows]
    a, b = sum_dense(dense, entries), sum_sparse(sparse, entries)
    if not np.allclose(a, b, rtol=1e-12, atol=1e-15):
        raise AssertionError("sparse and dense sums differ")
    dense_bytes, sparse_bytes = sum(map(len, dense)), sum(len(d) + len(v) for d, v in sparse)
    dense_s = _best_seconds(lambda: sum_dense(dense, entries), repeats)
    sparse_s = _best_seconds(lambda: sum_sparse(sparse, entries), repeats)
    return {"density": float(np.count_nonzero(rows) / rows.size), "raw_mb": rows.nbytes / 1e6,
            "dense_mb": dense_bytes / 1e6, "sparse_mb": sparse_bytes / 1e6,
            "bytes_ratio": sparse_bytes / dense_bytes, "dense_sum_ms": 1e3 * dense_s,
            "sparse_sum_ms": 1e3 * sparse_s, "sum_time_ratio": sparse_s / dense_s}


def store_rows(url: str, count: int, seed: int = 0) -> np.ndarray:
    """`count` random rows of the store's datamodels row copy, flattened (count × p·k)."""
    from attribution.store import AttributionStore
    from matching.direct import fitted_group

    fit = fitted_group(AttributionStore.open(url, mode="r"), "datamodels")
    n = fit.store.spec.n_train
    ids = np.sort(np.random.default_rng(seed).choice(n, min(count, n), replace=False))
    return fit.read_weight_rows(ids).reshape(len(ids), -1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=384_000, help="p·k per synthetic row (n = 32k: 38,400 × 10)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.03, 0.09, 0.28])
    parser.add_argument("--rows", type=int, default=100, help="rows per density (a request's |F|)")
    parser.add_argument("--store", help="also measure this store's datamodels row copy")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    results = {}
    for density in args.densities:
        results[f"{density:g}"] = compare(synthetic_rows(args.entries, density, args.rows), args.repeats)
    if args.store:
        results["store"] = compare(store_rows(args.store, args.rows), args.repeats)
    for name, r in results.items():
        print(f"{name:>6}: density {r['density']:.3f}  dense {r['dense_mb']:.2f} MB  sparse {r['sparse_mb']:.2f} MB"
              f"  (×{r['bytes_ratio']:.2f})  sum {r['dense_sum_ms']:.1f} vs {r['sparse_sum_ms']:.1f} ms"
              f"  (×{r['sum_time_ratio']:.2f})")
    ratios = [r["bytes_ratio"] for r in results.values()]
    summary = {"bench": "sparse_beta", "entries": args.entries, "rows": args.rows, "per_density": results,
               "min_bytes_ratio": min(ratios), "max_bytes_ratio": max(ratios)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
