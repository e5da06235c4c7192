"""TRAK stage (attribution/trak.py, `dmm trak`) end to end on a tiny digits store: 64 subset models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution import trak
from attribution.datasets import load_dataset
from attribution.engine import train_batched
from attribution.lds import holdout_split, measure, predict
from attribution.models import build_model
from attribution.recipes import default_recipe
from attribution.store import AttributionStore, StoreSpec
from attribution.subsets import block_subsets
from cluster.cli import main

NUM_MODELS, BLOCK, HOLDOUT = 64, 32, 16
SETTINGS = trak.TrakSettings(checkpoints=2, proj_dim=128, holdout_models=HOLDOUT, target_chunk=600)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, one_torch_thread):
    """A digits store with 64 subset models (α = 0.5, default recipe) and its trak/ group computed once."""
    data = load_dataset("digits")
    recipe = default_recipe(data.name)
    spec = StoreSpec(dataset=data.name, fingerprint=data.fingerprint, model="mlp", recipe=recipe.to_dict(),
                     alpha=0.5, seed=0, block_size=BLOCK, n_train=data.n_train, n_points=data.n_points,
                     num_classes=data.num_classes)
    store = AttributionStore.open_or_create(str(tmp_path_factory.mktemp("trak") / "store.zarr"), spec, NUM_MODELS)
    for block in store.missing_blocks():
        masks, seeds = block_subsets(spec.seed, block, BLOCK, data.n_train, spec.alpha)
        store.write_block(block, masks, train_batched("mlp", data, recipe, seeds, masks).logits.numpy())
    report = trak.run_trak(store, SETTINGS)
    return store, data, report


def test_trak_group_shapes_finite_and_complete(tiny_store):
    store, data, report = tiny_store
    n, p, k = data.n_train, data.n_points, data.num_classes
    group = store.fit_group("trak")
    assert group.is_complete() and group.num_chunks == 3
    assert (report.written, report.skipped, report.calibration_models) == (3, 0, NUM_MODELS - HOLDOUT)
    weight, bias = np.asarray(group.weight[:]), np.asarray(group.bias[:])
    assert weight.shape == (n, p, k) and bias.shape == (p, k)
    assert np.isfinite(weight).all() and np.isfinite(bias).all() and np.abs(weight).max() > 0
    assert group.lds.shape == (p, k) and group.lds_margin.shape == (p,)
    assert np.isnan(np.asarray(group.lam[:])).all()  # TRAK has no λ
    assert group.config["checkpoints"] == 2 and group.config["proj_dim"] == 128


def test_calibration_beats_the_constant_predictor(tiny_store):
    store, data, _ = tiny_store
    masks, logits, _ = store.read()
    fit_rows, eval_rows = holdout_split(len(masks), HOLDOUT)
    group = store.fit_group("trak")
    pred = predict(masks, np.asarray(group.weight[:]), np.asarray(group.bias[:]))
    # least squares with an intercept is never worse than its a = 0 case on the models it was fitted on
    mse = ((pred[fit_rows] - logits[fit_rows]) ** 2).mean(0)
    assert (mse <= logits[fit_rows].var(0) * (1 + 1e-4) + 1e-6).all()
    # and it generalises to the held-out models on average
    held = ((pred[eval_rows] - logits[eval_rows]) ** 2).mean()
    assert held < ((logits[eval_rows] - logits[fit_rows].mean(0)) ** 2).mean()


def test_lds_positive_and_matches_recomputation(tiny_store):
    store, data, report = tiny_store
    masks, logits, _ = store.read()
    _, eval_rows = holdout_split(len(masks), HOLDOUT)
    group = store.fit_group("trak")
    per_class, margin = measure(masks[eval_rows], np.asarray(group.weight[:]), np.asarray(group.bias[:]),
                                logits[eval_rows], data.all_labels().numpy())
    np.testing.assert_allclose(np.asarray(group.lds[:]), per_class, atol=1e-5)
    np.testing.assert_allclose(np.asarray(group.lds_margin[:]), margin, atol=1e-5)
    n = data.n_train
    assert np.nanmean(margin[:n]) > 0.1 and np.nanmean(per_class[:n]) > 0.1
    assert report.lds["train points, margin"]["mean"] == pytest.approx(np.nanmean(margin[:n]), abs=1e-5)


def test_rerun_skips_done_chunks_and_redoes_a_missing_one(tiny_store, monkeypatch):
    store, data, _ = tiny_store
    group = store.fit_group("trak")
    before = np.asarray(group.weight[:, group.target_slice(1)])
    group.done[1:2] = np.zeros(1, dtype=bool)
    again = trak.run_trak(store, SETTINGS)
    assert (again.written, again.skipped) == (1, 2) and group.is_complete()
    np.testing.assert_allclose(np.asarray(group.weight[:, group.target_slice(1)]), before, rtol=1e-4, atol=1e-6)

    monkeypatch.setattr(trak, "train_checkpoints", lambda *a, **k: pytest.fail("a complete group retrained"))
    assert (trak.run_trak(store, SETTINGS).written, group.is_complete()) == (0, True)


def test_calibrate_recovers_scale_and_intercept():
    rng = np.random.default_rng(0)
    tau = rng.standard_normal((20, 3, 2)).astype(np.float32)
    tau[:, 2, 1] = 0.0  # a target whose scores never vary: a = 0, b = mean
    masks = rng.random((40, 20)) < 0.5
    logits = 3.0 * predict(masks, tau, np.zeros((3, 2), np.float32)) + 2.0
    logits[:, 2, 1] = rng.standard_normal(40)
    weight, bias = trak.calibrate(tau, masks, logits)
    np.testing.assert_allclose(weight[:, :2], 3.0 * tau[:, :2], rtol=1e-4)
    np.testing.assert_allclose(bias[:2], 2.0, atol=1e-4)
    assert (weight[:, 2, 1] == 0).all() and bias[2, 1] == pytest.approx(logits[:, 2, 1].mean(), abs=1e-5)


def test_class_logit_output_measures_logit_c_or_the_margin():
    model = build_model("mlp", (64,), 10, seed=0)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    x, c = torch.randn(64), torch.tensor(3)
    logits = model(x.unsqueeze(0))[0]
    out = trak.ClassLogitOutput()
    margin = logits[3] - torch.logsumexp(torch.cat([logits[:3], logits[4:]]), 0)
    assert out.get_output(model, params, buffers, x, c).item() == pytest.approx(margin.item(), abs=1e-5)
    out.measure_logit = True
    assert out.get_output(model, params, buffers, x, c).item() == pytest.approx(logits[3].item(), abs=1e-6)


def test_cli_prints_lds_and_rejects_bad_holdout(tiny_store, capsys):
    store, _, _ = tiny_store
    args = ["trak", "--store", store.url, "--checkpoints", "2", "--proj-dim", "128",
            "--holdout-models", str(HOLDOUT), "--target-chunk", "600"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0 target chunks scored, 3 already done" in out and "LDS train points, margin: mean" in out
    assert main(args[:-4] + ["--holdout-models", str(NUM_MODELS)]) == 2
    assert "cannot hold out" in capsys.readouterr().err
