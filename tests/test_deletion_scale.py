"""The deletion scales c_self, c_cross (`dmm calibrate`, attribution/deletion_scale.py) and DM-Direct's use of them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_store import copy_store, digits_store, tree_hashes
from fixtures_synthetic import synthetic_store

from attribution.deletion_scale import CALIBRATION_BLOCK, calibrate, least_squares_scales, size_effect
from attribution.engine import train_model
from attribution.errors import DmmError
from attribution.evaluation import margins, model_logits
from attribution.forget_spread import subset_variances
from attribution.store import AttributionStore
from attribution.subsets import block_seeds, block_subsets
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


def test_with_the_size_effect_dm_direct_is_exact_where_outputs_are_linear_in_presence_and_size(tmp_path):
    """A world where y_x(S') = a_x + c_cross·Σ_{i∈S', i≠x} β_{i,x} + c_self·β_{x,x}·[x ∈ S'] + γ_x·|S'| exactly. The
    datamodel fitted on α-subsets has b_x = E_α[y_x] − α·Σ_S β_{i,x}; from θ0 = y(S) and b the size effect is n·γ, and
    DM-Direct with it predicts y(S∖F) itself."""
    store, betas, original = synthetic_store(tmp_path / "s.zarr", fit=("datamodels",))
    beta = betas["datamodels"].astype(np.float64)
    n, alpha, c_self, c_cross = store.spec.n_train, store.spec.alpha, 0.7, 0.4
    gamma = np.random.default_rng(1).standard_normal(original.shape) * 0.05
    own = np.zeros_like(original, dtype=np.float64)
    own[:n] = beta[np.arange(n), np.arange(n)]

    def world(present: np.ndarray) -> np.ndarray:  # y(S') without a_x
        total = beta[present].sum(axis=0)
        mine = np.zeros_like(own)
        mine[present] = own[present]
        return c_cross * (total - mine) + c_self * mine + gamma * len(present)

    everything = np.arange(n)
    a = original - world(everything)
    total = beta.sum(axis=0)
    expected_alpha = a + alpha * (c_cross * (total - own) + c_self * own) + gamma * alpha * n  # E over α-subsets
    bias = expected_alpha - alpha * total
    np.testing.assert_allclose(size_effect(original, bias, total, own, alpha, c_self, c_cross), n * gamma, atol=1e-9)

    fit = store.fit_group("datamodels")
    fit.write_deletion_scale({"scale_self": c_self, "scale_cross": c_cross, "full_models": 3}, n * gamma)
    forget = np.array([0, 3, 9, 10])
    kept = np.setdiff1d(everything, forget)
    reopened = AttributionStore.open(str(tmp_path / "s.zarr"))
    np.testing.assert_allclose(dm_direct_targets(reopened, forget), a + world(kept), atol=1e-4)
    fit.write_deletion_scale({"scale_self": c_self, "scale_cross": c_cross, "full_models": 0})  # a stale array: unused
    without = AttributionStore.open(str(tmp_path / "s.zarr"))
    np.testing.assert_allclose(dm_direct_targets(without, forget), a + world(kept) + len(forget) * gamma, atol=1e-4)


def test_calibrate_is_the_fit_of_one_at_a_time_models_on_looped_predictions(fixture):
    """The scales from an independent path: each model trained alone, p_j(x) summed row by row and split into
    x's own term and the rest, each taken along x's true class and its runner-up (looped), numpy's least squares."""
    store = AttributionStore.open(fixture.url)
    fit = store.fit_group("datamodels")
    data, models, alpha = fixture.data, 5, 0.9
    result = calibrate(fit, data, models=models, alpha=alpha, max_targets=data.n_points, full_models=2, class_models=2)
    assert (result.models, result.alpha, result.targets, result.full_models) == (models, alpha, data.n_points, 2)
    assert result.class_models == 2 and result.to_attrs()["class_models"] == 2

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
    labels, mean = data.all_labels().numpy(), np.mean(y, axis=0)
    runner_up = [max((c for c in range(data.num_classes) if c != labels[x]), key=lambda c: mean[x, c])
                 for x in range(data.n_points)]
    along = [np.array([[a[x, labels[x]] - a[x, runner_up[x]] for x in range(data.n_points)] for a in values])
             for values in (y, p_self, p_cross)]
    centred = [a - a.mean(0) for a in along]
    design = np.stack([centred[1].ravel(), centred[2].ravel()], axis=1)
    expected = np.linalg.lstsq(design, centred[0].ravel(), rcond=None)[0]
    assert (result.scale_self, result.scale_cross) == pytest.approx(tuple(expected), rel=1e-3)
    assert 0.3 < result.scale_cross < 1.5  # the datamodels do predict a deletion's effect, to a scale

    # the size effect: two models on all of S, alone; β summed row by row over S
    fulls = [model_logits(train_model(fixture.model, data, fixture.recipe, int(seed)), data.all_inputs())
             .numpy().astype(np.float64) for seed in block_seeds(store.spec.seed, CALIBRATION_BLOCK + 1, 2)]
    full = np.mean(fulls, 0)
    total, own = np.zeros_like(bias), np.zeros_like(bias)
    for i in range(data.n_train):
        row = fit.read_weight_rows([i])[0].astype(np.float64)
        total += row
        own[i] = row[i]
    n_gamma = ((full - bias - store.spec.alpha * total) / (1 - store.spec.alpha)
               - result.scale_cross * (total - own) - result.scale_self * own)
    np.testing.assert_allclose(result.size_effect, n_gamma, atol=2e-3)

    # the whole-class term: per class, two models on S ∖ S_c alone; Δ_c their mean logits minus the full ones', s^c the
    # sd their margins add to the full models' on the class's points (ddof 1 both)
    labels = data.y_train.numpy()
    full_margins = margins(torch.from_numpy(np.stack(fulls)[:, :data.n_train]), torch.from_numpy(labels)).numpy()
    removal = result.class_removal
    assert removal.shift.shape == (data.num_classes, data.n_points, data.num_classes)
    np.testing.assert_array_equal(removal.labels, labels)
    for c in (0, data.num_classes - 1):  # two of the classes, by the independent path
        without_c = [model_logits(train_model(fixture.model, data, fixture.recipe, int(seed), labels != c),
                                  data.all_inputs()).numpy().astype(np.float64)
                     for seed in block_seeds(store.spec.seed, CALIBRATION_BLOCK + 2 + c, 2)]
        np.testing.assert_allclose(removal.shift[c], np.mean(without_c, 0) - full, atol=2e-3)
        members = labels == c
        m_c = margins(torch.from_numpy(np.stack(without_c)[:, :data.n_train]), torch.from_numpy(labels)).numpy()
        extra = np.var(m_c[:, members], axis=0, ddof=1) - np.var(full_margins[:, members], axis=0, ddof=1)
        np.testing.assert_allclose(removal.spread[members], np.sqrt(np.maximum(extra, 0)), rtol=2e-3, atol=2e-3)
        assert removal.shift[c][np.flatnonzero(data.all_labels().numpy() == c), c].mean() < -1  # class c's logit falls

    # the forget spread: γ² = mean Var of the full-data models' margins (point by point) over the store's Var_in
    m = np.stack([margins(torch.from_numpy(f[:data.n_train]), torch.from_numpy(labels)).numpy() for f in fulls])
    var_in, var_out = subset_variances(store, labels)
    gamma = np.sqrt(np.var(m, axis=0).mean() / np.nanmean(var_in))  # ddof 0, as masked_variance
    assert result.spread_gamma == pytest.approx(gamma, rel=1e-3)
    np.testing.assert_allclose(result.forget_spread, gamma * np.sqrt(np.maximum(var_out - var_in, 0)), rtol=2e-3,
                               atol=1e-5)
    assert 0 < gamma < 1  # models that differ by their seed only vary less than the store's on half-subsets
    without = calibrate(fit, data, models=models, alpha=alpha, max_targets=data.n_points, full_models=0)
    m = np.stack([margins(torch.from_numpy(l[:data.n_train]), torch.from_numpy(labels)).numpy() for l in y])
    near_full = np.array([np.var(m[masks[:, x], x]) if masks[:, x].sum() >= 2 else np.nan for x in range(data.n_train)])
    assert without.spread_gamma == pytest.approx(np.sqrt(np.nanmean(near_full) / np.nanmean(var_in)), rel=1e-3)
    assert without.class_models == 0 and without.class_removal is None  # K = 0: no Var_S, so no class term by default


def test_the_cli_keeps_c_in_the_group_and_refuses_bad_input_in_one_line(run_dmm, fixture, tmp_path):
    url = copy_store(fixture, tmp_path / "store.zarr")
    before = tree_hashes(url)
    for args, message in ((["--models", "1"], "needs at least 2 calibration models"),
                          (["--full-models", "-1"], "K >= 0 full-data models"),
                          (["--alpha", "1.0"], "alpha=1.0 must lie strictly between 0 and 1"),
                          (["--class-models", "2", "--full-models", "0"], "needs K_c >= 2 models per class and K >= 2"),
                          (["--attribution", "trak"], "has no fitted trak")):
        result = run_dmm(["calibrate", "--store", url, *args])
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
    assert tree_hashes(url) == before
    result = run_dmm(["calibrate", "--store", url, "--models", "4", "--full-models", "2"])
    assert result.returncode == 0, result.stderr
    fit = AttributionStore.open(url).fit_group("datamodels")
    record, size = fit.attrs["deletion_scale"], fit.size_effect
    assert record["models"] == 4 and record["alpha"] == 0.95 and record["full_models"] == 2
    assert size.shape == (fixture.data.n_points, 10) and np.abs(size).max() > 0
    assert fit.forget_spread.shape == (fixture.data.n_train,) and (fit.forget_spread >= 0).all()
    assert f"forget spread γ = {record['spread_gamma']:.3f}" in result.stdout
    assert record["class_models"] == 16 and "16 models per class without it" in result.stdout  # K >= 2: K_c = 16
    assert fit.class_removal.shift.shape == (10, fixture.data.n_points, 10)
    assert f"c_self = {record['scale_self']:.4f}, c_cross = {record['scale_cross']:.4f}" in result.stdout
    assert "− |F|·γ'_x" in result.stdout
    again = run_dmm(["calibrate", "--store", url, "--models", "4", "--full-models", "2"])  # the same c, γ' to the bit
    fit = AttributionStore.open(url).fit_group("datamodels")
    assert fit.attrs["deletion_scale"] == record and np.array_equal(fit.size_effect, size), again.stderr
    none = run_dmm(["calibrate", "--store", url, "--models", "4", "--full-models", "0"])
    fit = AttributionStore.open(url).fit_group("datamodels")
    assert fit.attrs["deletion_scale"]["full_models"] == 0 and fit.size_effect is None, none.stderr
