"""benchmarks/bench_sparse_beta.py: both row forms give DM-Direct's sum exactly, and its zeros are +0.0 like the fit's."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_sparse_beta as bench  # noqa: E402


def test_both_forms_sum_to_the_brute_force_float64_sum():
    rows = bench.synthetic_rows(entries=5_000, density=0.05, rows=7, seed=3)
    expected = np.zeros(5_000, dtype=np.float64)
    for r in rows:
        expected += r.astype(np.float64)
    dense = bench.sum_dense([bench.encode_dense(r) for r in rows], 5_000)
    sparse = bench.sum_sparse([bench.encode_sparse(r) for r in rows], 5_000)
    np.testing.assert_array_equal(dense, expected)
    np.testing.assert_array_equal(sparse, expected)  # same float64 additions, same order


def test_synthetic_zeros_are_positive_and_at_the_asked_density():
    rows = bench.synthetic_rows(entries=20_000, density=0.09, rows=5)
    zeros = rows == 0
    assert not np.signbit(rows[zeros]).any()  # -0.0 would compress worse than the fit's +0.0 and skew the bytes
    assert abs(1 - zeros.mean() - 0.09) < 0.01


def test_compare_reports_fewer_sparse_bytes_at_one_percent_and_refuses_unequal_sums(monkeypatch):
    result = bench.compare(bench.synthetic_rows(entries=50_000, density=0.01, rows=4), repeats=1)
    assert result["bytes_ratio"] < 1 and abs(result["density"] - 0.01) < 0.002
    monkeypatch.setattr(bench, "sum_sparse", lambda encoded, entries: np.ones(entries))
    with pytest.raises(AssertionError, match="sparse and dense sums differ"):
        bench.compare(bench.synthetic_rows(entries=1_000, density=0.1, rows=2), repeats=1)
