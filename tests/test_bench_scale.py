"""benchmarks/bench_scale.py's core at tiny n: its JSON keys, and objects/bytes per request counted, not assumed."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_scale  # noqa: E402
from attribution.store import AttributionStore  # noqa: E402


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    base = tmp_path_factory.mktemp("scale")
    return [bench_scale.measure_size(base, n, models=64, solve_targets=2, max_iter=2, repeats=1,
                                     fit_memory_gb=1.0, isolate=False) for n in (40, 60)]


def test_summary_has_the_issue_keys_and_one_object_per_forget_id_from_the_row_copy(rows):
    summary = bench_scale.summarize(rows)
    assert {"objects_per_forget_row", "fit_read_amplification", "exponents"} <= set(summary)
    assert summary["objects_per_forget_row"] == 1.0  # counted: one weight_rows object per forget id, both groups
    for row in rows:
        for prefix in ("datamodels", "trak"):
            (req,) = row[prefix]  # |F| = 10 only: 100 and 1000 exceed n
            assert req["forget"] == 10 and req["objects"] == 10
    exps = summary["exponents"]
    assert exps["stored_mb"] is not None and exps["datamodels_request_s_F10"] is not None
    assert exps["trak_request_mb_F1000"] is None  # never measured at these n
    # the TRAK rows are dense, the datamodels rows 9 % non-zero: the same objects, far fewer bytes
    assert rows[1]["datamodels"][0]["mb_read"] < 0.5 * rows[1]["trak"][0]["mb_read"]
    amp = summary["fit_read_amplification"]
    assert amp >= 0.9 and math.isfinite(amp)  # a task reads at least (about) its own share
    assert rows[0]["fit_read_mb"] > 0 and rows[0]["solved_targets"] == 2


def test_request_bytes_are_the_stored_row_objects(tmp_path):
    url = str(tmp_path / "s.zarr")
    bench_scale.build_store(url, 30, 64)
    forget = np.array([2, 7, 11])
    bench_scale.write_beta_rows(url, "trak", forget, 1.0)
    (req,) = bench_scale.measure_requests(url, "trak", [forget], 1)
    on_disk = sum((tmp_path / "s.zarr" / "trak" / "weight_rows" / "c" / str(i) / "0" / "0").stat().st_size
                  for i in forget)
    assert req["objects"] == 3 and req["mb_read"] == pytest.approx(on_disk / 1e6, abs=1e-9)


def test_without_the_row_copy_a_forget_id_costs_one_object_per_target_chunk(tmp_path):
    """The counter is not a constant: from `weight` (chunks 1 row × 16 targets) a row is ⌈36 / 16⌉ = 3 objects,
    and without a complete copy the request also reads the 3 target chunks' markers: 2 × 3 + 3 = 9."""
    url = str(tmp_path / "s.zarr")
    bench_scale.build_store(url, 30, 64)  # p = 36
    store = AttributionStore.open(url, "r+")
    group = store.create_fit_group("datamodels", 16, 1, {})
    forget = np.array([4, 9])
    beta = np.random.default_rng(0).standard_normal((2, 36, bench_scale.K)).astype(np.float32)
    group.weight.set_orthogonal_selection((forget, slice(None), slice(None)), beta)
    group.done[:] = True
    (req,) = bench_scale.measure_requests(url, "datamodels", [forget], 1)
    assert req["objects"] == 9 and req["objects_per_forget_row"] == 4.5
    effect = store.fit_group("datamodels").sum_weight_rows(forget)
    np.testing.assert_allclose(effect, beta.astype(np.float64).sum(0), rtol=1e-6)


def test_exponent_is_the_log_log_slope():
    assert bench_scale.exponent([1000, 2000, 4000], [3.0, 12.0, 48.0]) == 2.0
    assert bench_scale.exponent([1000, 2000], [5.0, 5.0]) == 0.0
    assert bench_scale.exponent([1000, 2000], [5.0, None]) is None
