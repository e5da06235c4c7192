"""LDS (attribution/lds.py): Spearman over models against scipy, datamodel predictions, margins, summaries."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from attribution.errors import DmmError
from attribution.datamodels import validation_split
from attribution.lds import (DEFAULT_HOLDOUT, MIN_MODELS, default_holdout, format_report, format_summary, holdout_split,
                            lds, measure, predict, report, summarize)
from fixtures_store import np_margin


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, size=(17, 6, 5)).astype(np.float32)  # few values: many ties
    real = rng.integers(0, 6, size=(17, 6, 5)).astype(np.float64)
    real[:, 0, 0] = rng.standard_normal(17)  # one tie-free column
    got = lds(pred, real)
    assert got.shape == (6, 5)
    want = np.array([[scipy.stats.spearmanr(pred[:, i, j], real[:, i, j]).statistic for j in range(5)]
                     for i in range(6)])
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_predict_equals_brute_force_sum():
    rng = np.random.default_rng(1)
    h, n, t, k = 5, 9, 4, 3
    masks = rng.random((h, n)) < 0.5
    weight = rng.standard_normal((n, t, k)).astype(np.float32)
    bias = rng.standard_normal((t, k)).astype(np.float32)
    want = np.empty((h, t, k))
    for j in range(h):
        for x in range(t):
            for c in range(k):
                want[j, x, c] = bias[x, c] + sum(weight[i, x, c] for i in range(n) if masks[j, i])
    np.testing.assert_allclose(predict(masks, weight, bias), want, rtol=1e-5, atol=1e-5)


def test_measure_margin_is_margin_of_predicted_logits():
    rng = np.random.default_rng(2)
    h, n, t, k = 12, 8, 3, 4
    masks = rng.random((h, n)) < 0.5
    weight = rng.standard_normal((n, t, k)).astype(np.float32)
    bias = rng.standard_normal((t, k)).astype(np.float32)
    logits = rng.standard_normal((h, t, k)).astype(np.float32)
    labels = np.array([0, 3, 1])
    per_class, margin = measure(masks, weight, bias, logits, labels)
    pred = predict(masks, weight, bias)
    assert per_class.shape == (t, k) and margin.shape == (t,)
    for x in range(t):
        pm = [np_margin(pred[j, x], labels[x]) for j in range(h)]
        rm = [np_margin(logits[j, x], labels[x]) for j in range(h)]
        assert margin[x] == pytest.approx(scipy.stats.spearmanr(pm, rm).statistic, abs=1e-6)
        for c in range(k):
            assert per_class[x, c] == pytest.approx(scipy.stats.spearmanr(pred[:, x, c], logits[:, x, c]).statistic)


def test_perfect_linear_data_gives_lds_one():
    rng = np.random.default_rng(3)
    masks = rng.random((20, 30)) < 0.5
    weight = rng.standard_normal((30, 5, 3)).astype(np.float32)
    bias = rng.standard_normal((5, 3)).astype(np.float32)
    real = predict(masks, weight, bias)
    per_class, margin = measure(masks, weight, bias, real, np.zeros(5, dtype=np.int64))
    np.testing.assert_allclose(per_class, 1.0, atol=1e-12)
    np.testing.assert_allclose(margin, 1.0, atol=1e-12)
    np.testing.assert_allclose(lds(real, 2 * real.astype(np.float64) ** 3 + 1), 1.0, atol=1e-12)  # monotone


def test_a_constant_prediction_scores_zero_and_a_constant_output_is_nan():
    rng = np.random.default_rng(4)
    pred, real = rng.standard_normal((10, 4)), rng.standard_normal((10, 4))
    pred[:, 1] = 0.5  # predicts nothing of a varying output: LDS 0
    real[:, 2] = -1.0  # nothing to predict: undefined
    pred[:, 3], real[:, 3] = 0.5, -1.0
    got = lds(pred, real)
    assert np.isfinite(got[0]) and got[1] == 0.0 and np.isnan(got[2]) and np.isnan(got[3])


def test_an_all_zero_datamodel_counts_as_lds_zero_in_the_summaries():
    """Three targets: two with their real weights (LDS 1) and one all-zero datamodel. The means count it
    as 0 (2/3), not as a dropped NaN (which would report 1.0)."""
    rng = np.random.default_rng(5)
    masks = rng.random((20, 30)) < 0.5
    weight = rng.standard_normal((30, 3, 4)).astype(np.float32)
    bias = rng.standard_normal((3, 4)).astype(np.float32)
    real = predict(masks, weight, bias)
    weight[:, 2] = 0.0
    per_class, margin = measure(masks, weight, bias, real, np.array([0, 1, 2]))
    np.testing.assert_array_equal(per_class[2], 0.0)
    assert margin[2] == 0.0
    summaries = report(per_class, margin, n_train=3)
    assert summaries["train points, per class"]["mean"] == pytest.approx(2 / 3)
    assert summaries["train points, margin"] == pytest.approx(
        {"mean": 2 / 3, "q25": 0.5, "median": 1.0, "q75": 1.0, "n": 3, "undefined": 0})
    assert summaries["held-out points, margin"]["n"] == 0
    assert list(summaries) == ["held-out points, per class", "held-out points, margin",
                               "train points, per class", "train points, margin"]
    assert format_report(summaries)[3] == "  " + format_summary("train points, margin", summaries["train points, margin"])


def test_shape_mismatch_is_an_input_error():
    with pytest.raises(DmmError, match="one shape"):
        lds(np.zeros((4, 2)), np.zeros((4, 3)))


def test_summarize_and_format_say_how_many_values_were_undefined():
    s = summarize(np.array([[0.1, 0.2], [0.3, np.nan], [0.4, 0.5]]))
    assert s == pytest.approx({"mean": 0.3, "q25": 0.2, "median": 0.3, "q75": 0.4, "n": 5, "undefined": 1})
    assert (format_summary("margin", s)
            == "LDS margin: mean 0.300 | q25 0.200  median 0.300  q75 0.400 (n=5, 1 undefined left out)")
    full = summarize(np.array([0.1, 0.3]))
    assert format_summary("margin", full) == "LDS margin: mean 0.200 | q25 0.150  median 0.200  q75 0.250 (n=2)"
    empty = summarize(np.full(3, np.nan))
    assert empty["n"] == 0 and empty["undefined"] == 3 and np.isnan(empty["mean"])


def test_holdout_split_holds_out_the_first_models():
    assert holdout_split(10, 3) == (slice(3, 10), slice(0, 3))
    for bad in (2, 9):
        with pytest.raises(DmmError, match="--holdout-models"):
            holdout_split(10, bad)


def test_the_default_holdout_keeps_100_and_lets_a_small_store_be_fitted():
    """`dmm demo --num-models 64` and `dmm evaluate` building a small store used to stop after the estimate: 100
    held-out models of 64. Every store of at least MIN_MODELS now splits, and keeps most of its models to fit."""
    assert [default_holdout(m) for m in (2048, 200, 199, 64, 15, 6)] == [100, 100, 39, 12, 3, 3]
    for m in range(MIN_MODELS, 1000):
        fit_rows, held_out = holdout_split(m, default_holdout(m))
        train, val = validation_split(fit_rows.stop - fit_rows.start)
        assert held_out.stop == default_holdout(m) <= DEFAULT_HOLDOUT and train.stop >= 2 and val.stop > val.start
        assert fit_rows.stop - fit_rows.start >= default_holdout(m)  # fits on at least as many as it holds out
    with pytest.raises(DmmError, match="only 2 fitting models"):
        validation_split(MIN_MODELS - 1 - default_holdout(MIN_MODELS - 1))
