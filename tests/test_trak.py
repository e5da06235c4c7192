"""TRAK stage (attribution/trak.py, `dmm trak`) end to end on a tiny digits store: 64 subset models."""
from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import scipy.stats
import torch
from trak.projectors import BasicProjector, ProjectionType

from attribution import trak
from attribution.datasets import load_dataset
from attribution.engine import train_batched
from attribution.errors import DmmError
from attribution.lds import holdout_split, predict
from attribution.models import build_model
from attribution.recipes import default_recipe
from attribution.store import AttributionStore, StoreError, StoreMismatch, StoreSpec
from attribution.subsets import block_subsets
from cluster.cli import main

from fixtures_store import np_margin, tree_hashes

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


def test_calibration_is_least_squares_on_the_fitting_models(tiny_store):
    """numpy's lstsq of y_j on [S_j·β, 1] over the fitting models must give slope 1 and intercept β0:
    β = a·τ, β0 = b are the least-squares fit there (not on the held-out models, not without an intercept)."""
    store, data, _ = tiny_store
    masks, logits, _ = store.read()
    fit_rows, _ = holdout_split(len(masks), HOLDOUT)
    group = store.fit_group("trak")
    weight, bias = np.asarray(group.weight[:], np.float64), np.asarray(group.bias[:], np.float64)
    x = masks[fit_rows].astype(np.float64)
    rng = np.random.default_rng(0)
    pairs = [(int(p), int(c)) for p, c in zip(rng.integers(0, data.n_points, 40), rng.integers(0, 10, 40))]
    for p, c in pairs:
        z, y = x @ weight[:, p, c], logits[fit_rows, p, c].astype(np.float64)
        (slope, intercept), *_ = np.linalg.lstsq(np.stack([z, np.ones_like(z)], 1), y, rcond=None)
        assert slope == pytest.approx(1.0, abs=1e-3) and intercept == pytest.approx(bias[p, c], abs=1e-3), (p, c)


def test_stored_lds_is_spearman_over_the_held_out_models(tiny_store):
    store, data, report = tiny_store
    masks, logits, _ = store.read()
    _, eval_rows = holdout_split(len(masks), HOLDOUT)
    group = store.fit_group("trak")
    weight, bias = np.asarray(group.weight[:], np.float64), np.asarray(group.bias[:], np.float64)
    stored, stored_margin = np.asarray(group.lds[:]), np.asarray(group.lds_margin[:])
    x, real = masks[eval_rows].astype(np.float64), logits[eval_rows].astype(np.float64)
    labels = data.all_labels().numpy()
    for p in (0, 5, 700, 1436, 1437, 1796):  # train and held-out points, across chunks
        pred = x @ weight[:, p, :] + bias[p]  # (H, k)
        for c in range(data.num_classes):
            want = scipy.stats.spearmanr(pred[:, c], real[:, p, c]).statistic
            assert stored[p, c] == pytest.approx(want, abs=1e-5), (p, c)
        want = scipy.stats.spearmanr(np_margin(pred, labels[p]), np_margin(real[:, p], labels[p])).statistic
        assert stored_margin[p] == pytest.approx(want, abs=1e-5), p
    n = data.n_train
    assert np.mean(stored_margin[:n]) > 0.1 and np.mean(stored[:n]) > 0.1
    assert report.lds["train points, margin"]["mean"] == pytest.approx(np.mean(stored_margin[:n]), abs=1e-5)


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


def test_a_resumed_fit_keeps_its_first_models_and_checkpoints(tiny_store, tmp_path, monkeypatch):
    """Chunk 1 rescored after the store grew (and with the trainer now giving other checkpoints) equals the
    chunk scored with the first run's 48 calibration models and kept checkpoints."""
    store, data, _ = tiny_store
    copy = AttributionStore.open(shutil.copytree(store.url, tmp_path / "s.zarr"), mode="r+")
    group = copy.fit_group("trak")
    before = np.asarray(group.weight[:, group.target_slice(1)])
    group.done[1:2] = np.zeros(1, dtype=bool)
    copy.ensure_capacity(NUM_MODELS + BLOCK)  # the store grows by a block of (noise) models
    rng = np.random.default_rng(0)
    copy.write_block(2, rng.random((BLOCK, data.n_train)) < 0.5,
                     rng.standard_normal((BLOCK, data.n_points, data.num_classes)).astype(np.float32))
    train, noise = trak.train_checkpoints, torch.Generator().manual_seed(0)
    monkeypatch.setattr(trak, "train_checkpoints", lambda *a, **k: [
        {name: v + 0.1 * torch.randn(v.shape, generator=noise) for name, v in state.items()} for state in train(*a, **k)])
    again = trak.run_trak(copy, SETTINGS)
    assert (again.written, again.skipped, again.calibration_models) == (1, 2, NUM_MODELS - HOLDOUT)
    assert group.config["calibration_blocks"] == [0, 1]
    np.testing.assert_allclose(np.asarray(group.weight[:, group.target_slice(1)]), before, rtol=1e-4, atol=1e-6)


def test_a_resume_with_other_settings_or_without_kept_checkpoints_is_refused(tiny_store, tmp_path):
    store, _, _ = tiny_store
    copy = AttributionStore.open(shutil.copytree(store.url, tmp_path / "s.zarr"), mode="r+")
    copy.fit_group("trak").done[1:2] = np.zeros(1, dtype=bool)
    digest = tree_hashes(tmp_path / "s.zarr")
    with pytest.raises(StoreMismatch, match=r"trak/ .* other settings: checkpoints=2 \(now 3\); .*--overwrite"):
        trak.run_trak(copy, replace(SETTINGS, checkpoints=3))
    assert tree_hashes(tmp_path / "s.zarr") == digest
    shutil.rmtree(tmp_path / "s.zarr" / "trak" / trak.CHECKPOINTS)  # a group written before checkpoints were kept
    with pytest.raises(StoreError, match="no kept checkpoints.*--overwrite"):
        trak.run_trak(copy, SETTINGS)


def test_kept_checkpoints_round_trip_every_state_dict_entry():
    spec = StoreSpec(dataset="tiny", fingerprint="0" * 64, model="mlp", recipe={}, alpha=0.5, seed=0, block_size=2,
                     n_train=4, n_points=6, num_classes=2)
    group = AttributionStore.open_or_create("memory://trak-checkpoints", spec, 2).create_fit_group("trak", 6, 4)
    assert trak.stored_checkpoints(group) is None
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        net(torch.randn(5, 3))  # running statistics and the int64 0-d counter move
        states.append(net.state_dict())
    trak.keep_checkpoints(group, states)
    kept = trak.stored_checkpoints(group)
    assert len(kept) == 2 and all(list(k) == list(s) for k, s in zip(kept, states))
    for k, s in zip(kept, states):
        for name, value in s.items():
            assert k[name].dtype == value.dtype and torch.equal(k[name], value), name


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


@pytest.mark.parametrize("proj_dim", [64, trak.BASIC_BLOCK])
def test_one_checkpoint_with_proj_dim_up_to_100_is_refused_before_anything_is_written(tiny_store, capsys, proj_dim):
    store, _, _ = tiny_store
    before = tree_hashes(store.url)
    args = ["trak", "--store", store.url, "--checkpoints", "1", "--proj-dim", str(proj_dim), "--overwrite"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dmm: error: TRAK with 1 checkpoint needs proj_dim > 100, got {proj_dim}") and \
        err.endswith("fix: pass --proj-dim 101 or more, or --checkpoints 2 or more\n") and err.count("\n") == 1
    assert tree_hashes(store.url) == before  # --overwrite did not delete trak/


def test_the_proj_dim_refusal_covers_the_default_and_only_one_checkpoint():
    with pytest.raises(DmmError, match=r"needs proj_dim > 100, got 37"):
        trak.TrakSettings(checkpoints=1).resolve(300)  # P = n/8 = 37
    assert trak.TrakSettings(checkpoints=1, proj_dim=101).proj_dim == 101
    assert trak.TrakSettings(checkpoints=2).resolve(300).proj_dim == 37


@pytest.mark.parametrize("proj_dim, crashes", [(trak.BASIC_BLOCK, True), (trak.BASIC_BLOCK + 1, False)])
def test_traker_basic_projector_loses_its_matrix_for_one_block(proj_dim, crashes):
    """Why the refusal: finalize_features frees BasicProjector's matrix; projecting again for the same model id
    rebuilds it only when P spans several blocks. (If traker fixes this, drop the refusal.)"""
    projector = BasicProjector(grad_dim=16, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.normal, device="cpu")
    projector.free_memory()
    grads = torch.ones(2, 16)
    if crashes:
        with pytest.raises(AttributeError, match="proj_matrix"):
            projector.project(grads, model_id=0)
    else:
        assert projector.project(grads, model_id=0).shape == (2, proj_dim)
    assert projector.project(grads, model_id=1).shape == (2, proj_dim)  # another checkpoint id rebuilds it
