"""benchmarks/scaling_doc.py's ImageNet answers: the target-subset table computed from the shapes and the
measured TRAK ratio, and the sparse-β table taken from bench_sparse_beta's JSON, not assumed."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import scaling_doc  # noqa: E402


def bench_of(trak_ratio: float) -> dict:
    p, forget = 1_200, 10
    row_mb = trak_ratio * p * 10 * 4 / 1e6  # stored MB of one TRAK row at this ratio
    return {"rows": [{"p": p, "trak": [{"forget": forget, "mb_read": forget * row_mb}]}]}


def test_target_subset_rows_are_n_t_k_at_the_measured_trak_ratio():
    lines = scaling_doc.instead_at_imagenet(bench_of(0.5), None, subsets=(1_000,))
    n, k = scaling_doc.IMAGENET["n"], scaling_doc.IMAGENET["k"]
    row = next(line for line in lines if line.startswith("| 1,000 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{n * 1_000 * k:.2e}"  # 1.28e+12 entries
    assert cells[2] == scaling_doc.human(n * 1_000 * k * 4 * 0.5)  # β stored, at the ratio measured
    assert cells[3] == scaling_doc.human(1_000 * k * 4 * 0.5) and cells[4] == scaling_doc.human(1_000 * 1_000 * k * 4 * 0.5)
    assert any("stored/raw ratio 0.50" in line for line in lines)
    assert lines[-1].startswith("- **Sparse β**: not measured")


def test_sparse_rows_come_from_the_benchmark_json():
    sparse = {"rows": 7, "entries": 1_000, "per_density": {
        "0.01": {"density": 0.01, "dense_mb": 2.0, "sparse_mb": 1.0, "bytes_ratio": 0.5, "sum_time_ratio": 0.4},
        "0.3": {"density": 0.3, "dense_mb": 4.0, "sparse_mb": 3.6, "bytes_ratio": 0.9, "sum_time_ratio": 1.1},
        "store": {"density": 0.25, "dense_mb": 1.0, "sparse_mb": 0.95, "bytes_ratio": 0.95, "sum_time_ratio": 0.7}}}
    text = "\n".join(scaling_doc.instead_at_imagenet(bench_of(0.9), sparse))
    assert "saves 10%–50% of the bytes" in text and "takes 0.40–1.10× the time" in text  # synthetic rows only
    assert "| synthetic | 1.0% | 2.00 MB | 1.00 MB | 0.50 | 0.40 |" in text
    assert "| this store's datamodels (`--store`) | 25.0% | 1.00 MB | 0.95 MB | 0.95 | 0.70 |" in text
