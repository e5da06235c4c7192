"""The deletion scales c_self, c_cross (`dmm calibrate`, attribution/deletion_scale.py) and DM-Direct's use of them."""
from __future__ import annotations

import numpy as np
import pytest
from fixtures_store import copy_store, digits_store, tree_hashes
from test_matching import synthetic_store

from attribution.deletion_scale import CALIBRATION_BLOCK, calibrate, least_squares_scales
from attribution.engine import train_model
from attribution.errors import DmmError
from attribution.evaluation import model_logits
from attribution.store import AttributionStore
from attribution.subsets import block_subsets
from matching.direct import dm_direct_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return digits_store(tmp_path_factory.getbasetemp() / "digits-store")


def test_the_scales_are_exact_on_outputs_linear_in_the_two_predictions():
    rng = np.random.default_rng(0)
    p_self, p_cross = rng.standard_normal((2, 8, 5, 3))
    offsets = rng.standard_normal((5, 3))  # per (x, k): removed by centring over the models
    assert least_squares_scales(0.9 * p_self + 0.4 * p_cross + offsets, p_self, p_cross) == pytest.approx((0.9, 0.4, 1))
    no_self = np.zeros_like(p_self)  # no training point among the targets: one slope for both
    assert least_squares_scales(-2.0 * p_cross, no_self, p_cross) == pytest.approx((-2.0, -2.0, 1.0))
    y = 0.5 * p_self + 0.2 * p_cross + rng.standard_normal(p_self.shape)
    design = np.stack([(p - p.mean(0)).ravel() for p in (p_self, p_cross)], axis=1)
    expected = np.linalg.lstsq(design, (y - y.mean(0)).ravel(), rcond=None)[0]
    c_self, c_cross, r = least_squares_scales(y, p_self, p_cross)
    assert (c_self, c_cross) == pytest.approx(tuple(expected)) and 0 < r < 1


def test_predictions_that_never_change_are_refused():
    with pytest.raises(DmmError, match="same output for every calibration model"):
        least_squares_scales(np.ones((4, 2, 3)), np.zeros((4, 2, 3)), np.full((4, 2, 3), 5.0))


def test_dm_direct_scales_the_self_and_cross_effects_by_the_stored_scales(tmp_path):
    store, betas, original = synthetic_store(tmp_path / "s.zarr")
    beta = betas["datamodels"].astype(np.float64)
    forget = np.array([0, 4, 9])
    total = beta[forget].sum(axis=0)
    np.testing.assert_allclose(dm_direct_targets(store, forget), original - total, atol=1e-5)  # uncalibrated: (1, 1)
    store.fit_group("datamodels").write_deletion_scale({"scale_self": 0.5, "scale_cross": 0.25})
    expected = original - 0.25 * total
    for i in forget:  # x ∈ F: its own row's effect on it scaled by c_self instead
        expected[i] -= (0.5 - 0.25) * beta[i, i]
    reopened = AttributionStore.open(str(tmp_path / "s.zarr"))
    np.testing.assert_allclose(dm_direct_targets(reopened, forget), expected, atol=1e-5)
    np.testing.assert_allclose(dm_direct_targets(reopened, forget, "trak"),  # a group's scales are its own
                               original - betas["trak"][forget].astype(np.float64).sum(axis=0), atol=1e-5)


def test_calibrate_is_the_fit_of_one_at_a_time_models_on_looped_predictions(fixture):
    """The scales from an independent path: each model trained alone, p_j(x) summed row by row and split into
    x's own term and the rest, numpy's least squares."""
    store = AttributionStore.open(fixture.url)
    fit = store.fit_group("datamodels")
    data, models, alpha = fixture.data, 5, 0.9
    result = calibrate(fit, data, models=models, alpha=alpha, max_targets=data.n_points)
    assert (result.models, result.alpha, result.targets) == (models, alpha, data.n_points)

    masks, seeds = block_subsets(store.spec.seed, CALIBRATION_BLOCK, models, data.n_train, alpha)
    bias = np.asarray(fit.bias[:], dtype=np.float64)
    y, p_self, p_cross = [], [], []
    for mask, seed in zip(masks, seeds):
        model = train_model(fixture.model, data, fixture.recipe, int(seed), mask)
        y.append(model_logits(model, data.all_inputs()).numpy().astype(np.float64))
        rows = {int(i): fit.read_weight_rows([i])[0].astype(np.float64) for i in np.flatnonzero(mask)}
        own = np.zeros_like(bias)
        for i, row in rows.items():
            own[i] = row[i]
        p_self.append(own)
        p_cross.append(bias + sum(rows.values()) - own)
    centred = [np.stack(a) - np.stack(a).mean(0) for a in (y, p_self, p_cross)]
    design = np.stack([centred[1].ravel(), centred[2].ravel()], axis=1)
    expected = np.linalg.lstsq(design, centred[0].ravel(), rcond=None)[0]
    assert (result.scale_self, result.scale_cross) == pytest.approx(tuple(expected), rel=1e-3)
    assert 0.3 < result.scale_cross < 1.5  # the datamodels do predict a deletion's effect, to a scale


def test_the_cli_keeps_c_in_the_group_and_refuses_bad_input_in_one_line(run_dmm, fixture, tmp_path):
    url = copy_store(fixture, tmp_path / "store.zarr")
    before = tree_hashes(url)
    for args, message in ((["--models", "1"], "needs at least 2 calibration models"),
                          (["--alpha", "1.0"], "alpha=1.0 must lie strictly between 0 and 1"),
                          (["--attribution", "trak"], "has no fitted trak")):
        result = run_dmm(["calibrate", "--store", url, *args])
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
    assert tree_hashes(url) == before
    result = run_dmm(["calibrate", "--store", url, "--models", "4"])
    assert result.returncode == 0, result.stderr
    record = AttributionStore.open(url).fit_group("datamodels").attrs["deletion_scale"]
    assert record["models"] == 4 and record["alpha"] == 0.95
    assert f"c_self = {record['scale_self']:.4f}, c_cross = {record['scale_cross']:.4f}" in result.stdout
    again = run_dmm(["calibrate", "--store", url, "--models", "4"])  # the same models: the same c, to the bit
    assert AttributionStore.open(url).fit_group("datamodels").attrs["deletion_scale"] == record, again.stderr
