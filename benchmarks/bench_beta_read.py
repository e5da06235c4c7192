"""The floor of DM-Direct's β read: |F| rows of a digits-sized β through Zarr vs the same bytes read raw.

A digits β has n = 1437 train rows of p × k = 1797 × 10 float32 (72 KB a row). This writes one
uncompressed Zarr v3 array (one chunk per row, so a row is exactly one chunk file and Zarr has the
least work possible), then times reading |F| random rows, best of --repeats, three ways:
`Array.get_orthogonal_selection` (what `FitGroup.read_weight_rows` does), the same call on |F|
contiguous rows, and `np.fromfile` on the |F| chunk files (checked equal). It shows how much of a
DMM request on digits Zarr's reading costs before any other work (README, "A request's cost, part by
part": why requests read `weight_rows` as files).

Run: python benchmarks/bench_beta_read.py [--forget 50] [--repeats 5]
Prints a summary, then one JSON line last (ratio = Zarr scattered / raw).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

N_TRAIN, N_POINTS, K = 1437, 1797, 10


def best_of(repeats: int, read) -> tuple[float, np.ndarray]:
    """(shortest wall time of `repeats` calls, the last result)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rows = read()
        times.append(time.perf_counter() - start)
    return min(times), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--forget", type=int, default=50, help="|F|: β rows read")
    parser.add_argument("--repeats", type=int, default=5, help="timed reads of each kind; the best is reported")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    forget = np.sort(rng.choice(N_TRAIN, args.forget, replace=False))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "beta.zarr"
        beta = zarr.create_array(path, shape=(N_TRAIN, N_POINTS, K), chunks=(1, N_POINTS, K), dtype="float32",
                                 compressors=None)
        beta[:] = rng.standard_normal((N_TRAIN, N_POINTS, K), dtype=np.float32)
        beta = zarr.open_array(path, mode="r")
        scattered_s, via_zarr = best_of(args.repeats, lambda: beta.get_orthogonal_selection((forget, slice(None), slice(None))))
        contiguous_s, _ = best_of(args.repeats, lambda: beta[:args.forget])
        raw_s, raw = best_of(args.repeats, lambda: np.stack(
            [np.fromfile(path / "c" / str(i) / "0" / "0", dtype="<f4").reshape(N_POINTS, K) for i in forget]))
        if not np.array_equal(via_zarr, raw):
            raise SystemExit("raw chunk bytes differ from Zarr's read; the array layout is not the one assumed")
    mb = args.forget * N_POINTS * K * 4 / 1e6
    print(f"{args.forget} β rows ({mb:.1f} MB): Zarr scattered {scattered_s * 1e3:.1f} ms, Zarr contiguous "
          f"{contiguous_s * 1e3:.1f} ms, raw chunk files {raw_s * 1e3:.1f} ms; ratio {scattered_s / raw_s:.1f}")
    print(json.dumps({"bench": "beta_read", "zarr_scattered_s": round(scattered_s, 5),
                      "zarr_contiguous_s": round(contiguous_s, 5), "raw_s": round(raw_s, 5),
                      "ratio": round(scattered_s / raw_s, 2), "n_forget": args.forget, "mb": round(mb, 2)}))


if __name__ == "__main__":
    main()
