"""Whole-class deletions (attribution/class_removal.py): DM-Direct adds the measured shift Δ_c of a class F holds whole
and DMM's spread takes its s^c_x; `dmm calibrate` measures both (tests/test_deletion_scale.py checks them there)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fixtures_synthetic import N_POINTS, N_TRAIN, K, synthetic_store
from torch import nn

from attribution.class_removal import ClassRemoval
from attribution.deletion_scale import resolve_class_models
from attribution.errors import DmmError
from attribution.store import AttributionStore
from matching import methods
from matching.direct import SPREAD_STREAM, dm_direct_targets, whole_classes, with_forget_spread
from matching.finetune import MatchingConfig
from matching.methods import UnlearnTask, Unlearned

LABELS = np.array([0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 0, 0], dtype=np.int32)  # K = 3 classes; class 2 has no point
assert len(LABELS) == N_TRAIN and K == 3
CLASS_1 = np.flatnonzero(LABELS == 1)


def class_store(url):
    """The synthetic store (uncalibrated scales, no size term) with s_x and a whole-class term of random Δ and s^c."""
    store, betas, original = synthetic_store(url, fit=("datamodels",))
    rng = np.random.default_rng(5)
    removal = ClassRemoval(rng.standard_normal((K, N_POINTS, K)).astype(np.float32),
                           rng.uniform(1, 2, N_TRAIN).astype(np.float32), LABELS)
    spread = rng.uniform(0.1, 0.2, N_TRAIN).astype(np.float32)
    record = {"scale_self": 1.0, "scale_cross": 1.0, "spread_gamma": 0.5, "class_models": 2}
    store.fit_group("datamodels").write_deletion_scale(record, forget_spread=spread, class_removal=removal)
    return AttributionStore.open(str(url)), betas["datamodels"].astype(np.float64), original, removal, spread


def test_a_class_f_holds_whole_moves_by_its_measured_shift_and_the_rest_of_f_by_the_datamodels(tmp_path):
    store, beta, original, removal, _ = class_store(tmp_path / "s.zarr")
    fit = store.fit_group("datamodels")
    forget = np.sort(np.concatenate([CLASS_1, [3]]))  # all of class 1 and one point of class 0
    assert whole_classes(fit, forget) == [1]
    expected = original - beta[3] + removal.shift[1]
    np.testing.assert_allclose(dm_direct_targets(store, forget), expected, atol=1e-5)
    np.testing.assert_allclose(dm_direct_targets(store, CLASS_1), original + removal.shift[1], atol=1e-5)
    everything = np.arange(N_TRAIN)  # classes 0 and 1 whole: the shifts add; class 2 has no point, so never whole
    assert whole_classes(fit, everything) == [0, 1]
    np.testing.assert_allclose(dm_direct_targets(store, everything), original + removal.shift[0] + removal.shift[1],
                               atol=1e-5)
    part = CLASS_1[:-1]  # one point of class 1 stays: the datamodels' sum, as without the term
    assert whole_classes(fit, part) == []
    np.testing.assert_allclose(dm_direct_targets(store, part), original - beta[part].sum(axis=0), atol=1e-5)


def test_a_store_without_class_models_sums_the_datamodels_for_a_whole_class_too(tmp_path):
    store, betas, original = synthetic_store(tmp_path / "s.zarr", fit=("datamodels",))
    fit = store.fit_group("datamodels")
    fit.write_deletion_scale({"scale_self": 1.0, "scale_cross": 1.0, "class_models": 0},
                             class_removal=ClassRemoval(np.ones((K, N_POINTS, K), np.float32),
                                                        np.ones(N_TRAIN, np.float32), LABELS))  # a stale term: unused
    reopened = AttributionStore.open(str(tmp_path / "s.zarr"))
    assert reopened.fit_group("datamodels").class_removal is None
    np.testing.assert_allclose(dm_direct_targets(reopened, CLASS_1),
                               original - betas["datamodels"][CLASS_1].astype(np.float64).sum(axis=0), atol=1e-5)


def test_dmm_draws_a_whole_class_with_its_measured_spread_and_records_the_class(tmp_path, monkeypatch):
    store, _, original, removal, spread = class_store(tmp_path / "s.zarr")
    fit = store.fit_group("datamodels")
    forget = np.sort(np.concatenate([CLASS_1, [3]]))
    targets = np.zeros_like(original)
    out = with_forget_spread(targets, fit, forget, LABELS, 0.5, seed=7)
    rng = np.random.default_rng([7, SPREAD_STREAM])
    z = rng.standard_normal(len(forget))  # one per point, as without the term; then one for class 1, shared
    z[LABELS[forget] == 1] = rng.standard_normal()
    s = np.where(LABELS[forget] == 1, removal.spread[forget], spread[forget])  # s^c on class 1, s_x on point 3
    expected = targets.copy()
    expected[forget, LABELS[forget]] += (0.5 * s * z).astype(np.float32)
    np.testing.assert_array_equal(out, expected)
    moved = (out - targets)[forget, LABELS[forget]] / (0.5 * s)
    assert len(np.unique(moved[LABELS[forget] == 1].round(5))) == 1 and moved[forget == 3][0] != moved[0]  # shared by the class
    two = with_forget_spread(targets, fit, np.arange(N_TRAIN), LABELS, 1.0, seed=7)[np.arange(N_TRAIN), LABELS]
    draws = two / removal.spread
    assert len(np.unique(draws[LABELS == 0].round(5))) == 1 and len(np.unique(draws[LABELS == 1].round(5))) == 1
    assert not np.isclose(draws[LABELS == 0][0], draws[LABELS == 1][0])  # a draw per class

    seen = []
    monkeypatch.setattr(methods, "match_on_forget_and_retain",
                        lambda task, targets, whole: seen.append((targets, whole)) or Unlearned(task.model, {}))
    task = UnlearnTask(model=nn.Linear(1, 1),
                       data=SimpleNamespace(y_train=torch.from_numpy(LABELS.astype(np.int64)), n_train=N_TRAIN),
                       forget_ids=forget, store=store, original_logits=original, config=MatchingConfig(seed=7))
    result = methods.datamodel_matching(task)
    np.testing.assert_array_equal(seen[0][0], with_forget_spread(dm_direct_targets(store, forget, "datamodels", original),
                                                              fit, forget, LABELS, 1.0, 7))
    assert result.stats["whole_classes"] == seen[0][1] == [1] and result.stats["spread"] == 1.0


def test_the_number_of_class_models_resolves_by_default_and_bad_ones_are_refused_in_one_line():
    assert resolve_class_models(None, 16) == 16 and resolve_class_models(None, 1) == 0
    assert resolve_class_models(0, 0) == 0 and resolve_class_models(3, 2) == 3
    for class_models, full_models in ((2, 0), (2, 1), (1, 16), (-1, 16)):
        with pytest.raises(DmmError, match="needs K_c >= 2 models per class and K >= 2 full-data models") as err:
            resolve_class_models(class_models, full_models)
        assert "\n" not in str(err.value)
