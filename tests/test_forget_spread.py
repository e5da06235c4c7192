"""The forget spread s_x (attribution/forget_spread.py, `dmm calibrate`) and DMM's draw around DM-Direct's mean."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from fixtures_store import digits_store
from fixtures_synthetic import synthetic_store

import attribution.forget_spread as forget_spread_mod
from attribution.evaluation import margins
from attribution.forget_spread import forget_spread, masked_variance, subset_variances
from attribution.store import AttributionStore
import matching.methods as methods
from matching.direct import SPREAD_STREAM, dm_direct_targets, with_forget_spread
from matching.errors import MatchingError
from matching.finetune import MatchingConfig
from matching.methods import UnlearnTask, Unlearned

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_masked_variance_is_numpys_over_the_selected_rows():
    rng = np.random.default_rng(0)
    values, mask = rng.standard_normal((9, 6)), rng.random((9, 6)) < 0.5
    mask[:, 4], mask[:, 5] = False, np.eye(9, dtype=bool)[2]  # no row, one row: too few for a variance
    got = masked_variance(values, mask)
    for p in range(4):
        assert got[p] == pytest.approx(np.var(values[mask[:, p], p]), rel=1e-12)
    assert np.isnan(got[4]) and np.isnan(got[5])


def test_the_spread_is_gamma_times_the_extra_sd_and_never_negative():
    var_in, var_out = np.array([1.0, 2.0, 4.0, np.nan]), np.array([3.0, 1.0, 8.0, 5.0])
    near_full = np.array([0.5, 1.0, 1.0, np.nan])
    gamma, s = forget_spread(var_in, var_out, near_full)
    assert gamma == pytest.approx(np.sqrt((2.5 / 3) / (7 / 3)))
    np.testing.assert_allclose(s, [gamma * np.sqrt(2), 0, gamma * 2, 0], rtol=1e-6)  # out below in, or unknown: 0


def test_subset_variances_are_a_loop_over_points_of_the_stores_models(tmp_path_factory, monkeypatch):
    fixture = digits_store(tmp_path_factory.getbasetemp() / "digits-store")
    store = AttributionStore.open(fixture.url)
    labels = fixture.data.y_train.numpy()
    monkeypatch.setattr(forget_spread_mod, "POINT_CHUNK", 7)  # reads of 7 points, the last one short
    var_in, var_out = subset_variances(store, labels)
    masks, logits, _ = store.read()
    for x in range(fixture.data.n_train):
        m = margins(torch.from_numpy(logits[:, x].astype(np.float64)), torch.tensor(int(labels[x]))).numpy()
        assert var_in[x] == pytest.approx(np.var(m[masks[:, x]]), rel=1e-9)
        assert var_out[x] == pytest.approx(np.var(m[~masks[:, x]]), rel=1e-9)


def spread_store(url, spread=None):
    store, _, original = synthetic_store(url, fit=("datamodels",))
    if spread is not None:
        record = {"scale_self": 1.0, "scale_cross": 1.0, "spread_gamma": 0.5}
        store.fit_group("datamodels").write_deletion_scale(record, forget_spread=spread)
    return AttributionStore.open(str(url)), original


def test_dmm_targets_move_only_the_forgotten_points_true_class_by_a_seeded_draw(tmp_path):
    n_train = 16
    spread = np.linspace(0.1, 1.6, n_train).astype(np.float32)
    store, original = spread_store(tmp_path / "s.zarr", spread)
    fit = store.fit_group("datamodels")
    labels = np.arange(n_train) % original.shape[1]
    forget = np.array([2, 5, 11])
    targets = np.random.default_rng(3).standard_normal(original.shape).astype(np.float32)
    out = with_forget_spread(targets, fit, forget, labels, 0.8, seed=7)
    z = np.random.default_rng([7, SPREAD_STREAM]).standard_normal(3)
    expected = targets.copy()
    expected[forget, labels[forget]] += (0.8 * spread[forget] * z).astype(np.float32)
    np.testing.assert_array_equal(out, expected)
    assert (out != targets).sum() == 3
    again = with_forget_spread(targets, fit, forget, labels, 0.8, seed=7)
    other = with_forget_spread(targets, fit, forget, labels, 0.8, seed=8)
    assert np.array_equal(out, again) and not np.array_equal(out, other)
    every_label = torch.from_numpy(np.concatenate([labels, np.zeros(len(out) - n_train, dtype=labels.dtype)]))
    margin_moves = (margins(torch.from_numpy(out), every_label) - margins(torch.from_numpy(targets), every_label)).numpy()
    np.testing.assert_allclose(margin_moves[forget], 0.8 * spread[forget] * z, atol=1e-5)  # the margin by exactly it


def test_a_store_without_a_spread_is_refused_in_one_line(tmp_path):
    store, original = spread_store(tmp_path / "s.zarr")
    with pytest.raises(MatchingError, match=r"no forget spread.*rerun `dmm calibrate") as err:
        with_forget_spread(original, store.fit_group("datamodels"), [1], np.zeros(16, int), 1.0, 0)
    assert "\n" not in str(err.value)
    for bad in (-1.0, True, "wide"):
        with pytest.raises(MatchingError, match=f"spread {bad!r} is not a number >= 0") as err:
            MatchingConfig(spread=bad)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("calibrated", [True, False])
def test_by_default_dmm_draws_with_the_stores_spread_and_without_one_matches_the_mean(tmp_path, monkeypatch, calibrated):
    n_train = 16
    spread = np.linspace(0.1, 1.6, n_train).astype(np.float32)
    store, original = spread_store(tmp_path / "s.zarr", spread if calibrated else None)
    labels = np.arange(n_train) % original.shape[1]
    seen = []
    monkeypatch.setattr(methods, "match_on_forget_and_retain",
                        lambda task, targets, whole: seen.append((targets, whole)) or Unlearned(task.model, {}))
    forget = np.array([2, 5, 11])
    task = UnlearnTask(model=nn.Linear(1, 1), data=SimpleNamespace(y_train=torch.from_numpy(labels), n_train=n_train),
                       forget_ids=forget, store=store, original_logits=original, config=MatchingConfig(seed=7))
    by_default = methods.datamodel_matching(task)
    mean = dm_direct_targets(store, forget, "datamodels", original)
    drawn = with_forget_spread(mean, store.fit_group("datamodels"), forget, labels, 1.0, 7) if calibrated else mean
    np.testing.assert_array_equal(seen[0][0], drawn)
    assert by_default.stats["spread"] == (1.0 if calibrated else 0.0) and seen[0][1] == []
    explicit = methods.datamodel_matching(dataclasses.replace(task, config=MatchingConfig(seed=7, spread=0.0)))
    np.testing.assert_array_equal(seen[1][0], mean)
    assert explicit.stats["spread"] == 0.0
