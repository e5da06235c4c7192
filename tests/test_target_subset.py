"""Datamodels and TRAK for a target subset (`--targets`, attribution/target_subset.py): β is fitted only for the
points T, each target's regression unchanged, and requests read / match only fitted targets.

Stores: the synthetic digits-subset store of test_beta_rows (300 train / 500 points, logits = masks @ sparse β +
noise, no training), fitted once for every point and once for `random:60:3` in smaller chunks.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from attribution import trak
from attribution.checkpoint import model_meta, save_model
from attribution.errors import DmmError
from attribution.evaluation import model_logits
from attribution.models import build_model
from attribution.recipes import Recipe
from attribution.store import AttributionStore, StoreMismatch
from attribution.target_subset import IDS, parse_targets
from cluster.cli import main
from cluster.eval_stages import attribution_stage
from cluster.fit import fit_store
from matching import methods
from matching.direct import dm_direct_targets
from matching.errors import MatchingError
from matching.finetune import MatchingConfig
from matching.inputs import store_dataset
from matching.ledger import read_ledger
from matching.request import unlearn_request

from fixtures_store import MODEL, tree_hashes
from test_beta_rows import FIT, TRAK, synthetic_store

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:lasso:RuntimeWarning")]  # a target may stop at max_iter

SPEC = "random:60:3"
# solved to a relative duality gap of 1e-5: a target's β then agrees across fits (of other batches of targets) to
# ≈ 1e-4 of its scale 4.3, float32 solver noise; at test_beta_rows' 1e-3 / 50 iterations, to ≈ 1e-2
FULL_FIT = replace(FIT, tol=1e-5, max_iter=300, rows_per_chunk=64)  # every point, 128 targets a chunk (64 rows:
# a fifth of the files of 1-row chunks to write and to hash in the refusal tests)
SUBSET_FIT = replace(FULL_FIT, targets_per_chunk=32, targets=SPEC)  # 60 targets in 2 chunks
N_TRAIN, N_POINTS = 300, 500


@pytest.fixture(scope="module")
def stores(tmp_path_factory, one_torch_thread) -> dict:
    """{"all": a store fitted for every point, "subset": a copy fitted for SPEC, "report": its fit report}; read-only.
    """
    root = tmp_path_factory.mktemp("targets")
    url = synthetic_store(root, 128)
    subset = str(shutil.copytree(url, root / "subset.zarr"))
    fit_store(url, FULL_FIT)
    return {"all": url, "subset": subset, "report": fit_store(subset, SUBSET_FIT)}


def copy_of(url: str, tmp_path) -> str:
    return str(shutil.copytree(url, tmp_path / "s.zarr"))


def test_random_spec_is_sorted_distinct_and_fixed_by_its_seed():
    ids = parse_targets(SPEC, N_POINTS).ids
    assert ids.dtype == np.int64 and len(np.unique(ids)) == 60 and (np.diff(ids) > 0).all()
    assert ids.min() >= 0 and ids.max() < N_POINTS
    assert np.array_equal(ids, parse_targets(SPEC, N_POINTS).ids)
    assert not np.array_equal(ids, parse_targets("random:60:4", N_POINTS).ids)
    assert parse_targets("all", N_POINTS).ids is None and parse_targets(None, N_POINTS).count(N_POINTS) == N_POINTS


def test_a_subset_fit_equals_the_full_fit_at_its_target_ids(stores):
    """The defining property: each target's regression is independent of the others (same λ path settings)."""
    full = AttributionStore.open(stores["all"]).fit_group("datamodels")
    sub = AttributionStore.open(stores["subset"]).fit_group("datamodels")
    ids = parse_targets(SPEC, N_POINTS).ids
    assert sub.attrs["targets"] == SPEC and np.array_equal(sub.store.zarr_array(f"datamodels/{IDS}")[:], ids)
    assert sub.weight.shape == (N_TRAIN, 60, 10) and sub.weight_rows.shape == (N_TRAIN, 60, 10)
    assert sub.bias.shape == sub.lam.shape == sub.lds.shape == (60, 10) and sub.lds_margin.shape == (60,)
    assert sub.num_chunks == 2 and sub.completed_chunks() == [0, 1]
    assert "targets" not in full.attrs and full.store.group["datamodels"].get(IDS) is None  # today's layout
    w_full, w_sub = np.asarray(full.weight[:])[:, ids], np.asarray(sub.weight[:])
    assert np.count_nonzero(w_sub) > 0.01 * w_sub.size
    np.testing.assert_allclose(w_sub, w_full, rtol=0, atol=1e-3)
    np.testing.assert_allclose(sub.bias[:], full.bias[:][ids], rtol=0, atol=1e-3)
    np.testing.assert_array_equal(sub.lam[:], full.lam[:][ids])  # the same λ chosen on each path
    np.testing.assert_allclose(sub.lds_margin[:], full.lds_margin[:][ids], rtol=0, atol=1e-3)
    report = stores["report"]
    assert report["fitted_targets"] == 60 and report["targets"] == SPEC
    n_train_targets = int((ids < N_TRAIN).sum())  # LDS over fitted targets only
    assert report["lds"]["train points, margin"]["n"] + report["lds"]["train points, margin"].get("undefined", 0) \
        == n_train_targets


def test_a_subset_fit_resumes_its_missing_chunks_only(stores, tmp_path):
    url = copy_of(stores["subset"], tmp_path)
    before = np.asarray(AttributionStore.open(url).fit_group("datamodels").weight[:])
    assert fit_store(url, SUBSET_FIT)["chunks_fitted"] == 0
    AttributionStore.open(url, "r+").zarr_array("datamodels/done")[1] = False
    assert fit_store(url, SUBSET_FIT)["chunks_fitted"] == 1
    group = AttributionStore.open(url).fit_group("datamodels")
    assert group.weight_rows is not None and group.completed_chunks() == [0, 1]
    np.testing.assert_allclose(group.weight[:], before, rtol=0, atol=1e-6)  # the same targets refitted


def test_the_forget_sum_over_a_subset_is_the_sum_of_its_beta_rows(stores):
    sub = AttributionStore.open(stores["subset"]).fit_group("datamodels")
    forget = np.array([3, 17, 150, 299])
    got = sub.sum_weight_rows(forget)
    brute = np.asarray(sub.weight[:], dtype=np.float64)[forget].sum(axis=0)
    assert got.shape == (60, 10) and np.count_nonzero(got) > 0
    np.testing.assert_allclose(got, brute, rtol=1e-6, atol=1e-9)


def test_each_forget_rows_own_effect_is_read_from_its_own_column_or_zero(stores):
    """`sum_and_own_rows`' β_{i,i,:} (DM-Direct's self term): row i at the column of target i; 0 where i is not fitted."""
    sub = AttributionStore.open(stores["subset"]).fit_group("datamodels")
    ids = parse_targets(SPEC, N_POINTS).ids
    fitted_train = ids[ids < N_TRAIN][:2]
    unfitted = np.setdiff1d(np.arange(N_TRAIN), ids)[:2]
    forget = np.concatenate([fitted_train, unfitted])
    total, own = sub.sum_and_own_rows(forget)
    weight = np.asarray(sub.weight[:], dtype=np.float64)
    np.testing.assert_allclose(total, weight[forget].sum(axis=0), rtol=1e-6, atol=1e-9)
    columns = [int(np.flatnonzero(ids == i)[0]) for i in fitted_train]
    assert sub.target_columns(forget).tolist() == columns + [-1, -1]
    np.testing.assert_array_equal(own[:2], weight[fitted_train, columns])
    assert not own[2:].any() and own[:2].any()


def test_dm_direct_on_a_subset_predicts_fitted_targets_and_nan_elsewhere(stores):
    store = AttributionStore.open(stores["subset"])
    ids, forget = parse_targets(SPEC, N_POINTS).ids, np.array([3, 17, 150])
    theta0 = np.random.default_rng(0).standard_normal((N_POINTS, 10)).astype(np.float32)
    h = dm_direct_targets(store, forget, original_logits=theta0)
    effect = np.asarray(store.fit_group("datamodels").weight[:], dtype=np.float64)[forget].sum(axis=0)
    np.testing.assert_allclose(h[ids], theta0[ids] - effect, rtol=1e-5, atol=1e-5)
    others = np.setdiff1d(np.arange(N_POINTS), ids)
    assert np.isnan(h[others]).all() and not np.isnan(h[ids]).any()
    full = dm_direct_targets(AttributionStore.open(stores["all"]), forget, original_logits=theta0)
    assert not np.isnan(full).any()  # a fit of every point predicts every row


def _dmm(url: str, forget: np.ndarray, monkeypatch) -> tuple[np.ndarray, dict]:
    """(the points DMM matched on, its stats) for a request forgetting `forget` on the store at `url`."""
    store = AttributionStore.open(url)
    data = store_dataset(store)
    model = build_model(MODEL, data.input_shape, data.num_classes, seed=0)
    seen = []
    real = methods.matching_points
    monkeypatch.setattr(methods, "matching_points", lambda *a: seen.append(real(*a)) or seen[-1])
    task = methods.UnlearnTask(model=model, data=data, forget_ids=forget, store=store,
                               original_logits=model_logits(model, data.all_inputs()).numpy(),
                               config=MatchingConfig(min_steps=1, max_steps=2))
    out = methods.datamodel_matching(task)
    assert all(torch.isfinite(p).all() for p in out.model.parameters())  # no NaN target reached the loss
    return seen[0], out.stats


def test_dmm_on_a_subset_matches_only_fitted_targets(stores, monkeypatch):
    ids = parse_targets(SPEC, N_POINTS).ids
    train_ids = ids[ids < N_TRAIN]
    forget = np.sort(np.concatenate([train_ids[:3], np.setdiff1d(np.arange(N_TRAIN), ids)[:5]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # 3 of F are fitted: no warning
        points, stats = _dmm(stores["subset"], forget, monkeypatch)
    assert set(points) <= set(train_ids) and set(train_ids[:3]) <= set(points)
    assert len(points) == 3 + min(len(train_ids) - 3, 3 * len(forget))  # F ∩ T plus round(r·|F|) retain points
    assert stats["forget_fitted"] == 3


def save_theta0(store: AttributionStore, path) -> None:
    """Save θ0 for `store` (an untrained model of its architecture) at `path`."""
    data = store_dataset(store)
    model = build_model(MODEL, data.input_shape, data.num_classes, seed=0)
    save_model(path, model.state_dict(), model_meta(data, MODEL, Recipe.from_dict(store.spec.recipe), 0))


def test_a_request_on_a_subset_store_records_forget_fitted_in_the_ledger(stores, tmp_path):
    url = copy_of(stores["subset"], tmp_path)
    store = AttributionStore.open(url)
    theta0 = tmp_path / "theta0.safetensors"
    save_theta0(store, theta0)
    ids = parse_targets(SPEC, N_POINTS).ids
    forget = [int(ids[0]), int(ids[1]), int(np.setdiff1d(np.arange(N_TRAIN), ids)[0])]
    result = unlearn_request(url, theta0, forget, out=tmp_path / "u.safetensors",
                             config=MatchingConfig(min_steps=1, max_steps=2))
    assert result.stats["forget_fitted"] == 2 and read_ledger(store)[-1].stats["forget_fitted"] == 2


@pytest.mark.parametrize("source", ["subset", "all"])
def test_dmm_direct_says_which_rows_are_nan_and_saves_exactly_those(stores, tmp_path, capsys, source):
    """`dmm direct` on a subset store: the message counts the predicted points and the NaN rows, and the saved
    array is NaN in exactly the rows of the points not fitted; on a full fit neither (the message as before)."""
    store = AttributionStore.open(stores[source])
    save_theta0(store, tmp_path / "theta0.safetensors")
    (tmp_path / "forget.txt").write_text("3\n17\n150\n")
    out = tmp_path / "h.npy"
    assert main(["direct", "--store", store.url, "--forget", str(tmp_path / "forget.txt"), "--out", str(out),
                 "--model", str(tmp_path / "theta0.safetensors")]) == 0
    message = capsys.readouterr().out.strip()
    h = np.load(out)
    nan_rows = np.flatnonzero(np.isnan(h).any(axis=1))
    assert "\n" not in message and message.startswith(f"wrote DM-Direct logits ({N_POINTS}, 10)")
    if source == "all":
        assert nan_rows.size == 0 and message.endswith(f"-> {out}")
        return
    np.testing.assert_array_equal(nan_rows, np.setdiff1d(np.arange(N_POINTS), parse_targets(SPEC, N_POINTS).ids))
    assert np.isnan(h[nan_rows]).all()
    assert message.endswith(f"-> {out}; 60 of {N_POINTS} points predicted (fitted with --targets {SPEC}), "
                            f"the other {N_POINTS - 60} rows are NaN")


def test_status_shows_a_subset_fits_spec_and_count_and_a_full_fit_as_before(stores, capsys):
    """`dmm status`: a subset group's line adds its targets spec and |T|; an `all` group's has today's keys only."""
    groups = {}
    for source in ("subset", "all"):
        assert main(["status", "--store", stores[source]]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("datamodels: "))
        groups[source] = json.loads(line.removeprefix("datamodels: "))
    assert groups["subset"]["targets"] == SPEC and groups["subset"]["fitted_targets"] == 60
    assert groups["subset"]["completed_chunks"] == groups["subset"]["num_chunks"] == 2
    assert set(groups["all"]) == {"completed_chunks", "num_chunks", "target_chunk", "row_chunk", "row_copy", "config"}
    assert set(groups["subset"]) == set(groups["all"]) | {"targets", "fitted_targets"}


def test_dmm_warns_when_no_forget_id_is_fitted(stores, monkeypatch):
    ids = parse_targets(SPEC, N_POINTS).ids
    forget = np.setdiff1d(np.arange(N_TRAIN), ids)[:4]
    with pytest.warns(UserWarning, match=r"0 of the 4 forget ids are fitted targets .*dmm fit --targets ids:FILE"):
        points, stats = _dmm(stores["subset"], forget, monkeypatch)
    assert stats["forget_fitted"] == 0 and len(points) == 12 and set(points) <= set(ids)


def test_dmm_on_a_full_fit_keeps_its_matching_points_and_stats(stores, monkeypatch):
    forget = np.array([3, 17, 150])
    points, stats = _dmm(stores["all"], forget, monkeypatch)
    assert "forget_fitted" not in stats and len(points) == 12 and set(forget) <= set(points)


@pytest.mark.parametrize("spec, message", [
    ("some", r"is not a target spec; fix: pass all, random:T:SEED or ids:FILE"),
    ("random:10", r"is not random:T:SEED; fix"),
    ("random:0:1", r"asks for 0 targets of 500 points; fix: pick T in 1\.\.500"),
    ("ids:{out}", r"index 500 is out of range; fix: list point indices 0\.\.499"),
    ("ids:{dup}", r"index 7 is listed 2 times; fix: list each index once"),
    ("ids:{text}", r"'x' is not an integer index; fix"),
    ("ids:{missing}", r"cannot read .*; fix"),
])
def test_a_bad_spec_is_refused_in_one_line_and_writes_nothing(stores, tmp_path, spec, message):
    url = stores["all"]  # not a copy: the refusal must leave it byte for byte as it was
    files = {"out": "1\n500\n", "dup": "7\n3\n7\n", "text": "1\nx\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    spec = spec.format(missing=tmp_path / "missing", **{name: tmp_path / name for name in files})
    before = tree_hashes(url)
    with pytest.raises(DmmError, match=message) as err:
        fit_store(url, replace(FULL_FIT, targets=spec))
    assert "\n" not in str(err.value) and tree_hashes(url) == before


def test_an_ids_file_lists_its_points_sorted(tmp_path):
    (tmp_path / "t.txt").write_text("499\n0\n310\n42\n")  # unsorted, train and held-out points
    targets = parse_targets(f"ids:{tmp_path / 't.txt'}", N_POINTS)
    assert targets.ids.dtype == np.int64 and np.array_equal(targets.ids, [0, 42, 310, 499])
    assert targets.count(N_POINTS) == 4 and targets.train_count(N_TRAIN) == 2


@pytest.mark.parametrize("source, spec", [("subset", "all"), ("subset", "random:60:4"), ("all", SPEC)])
def test_refitting_with_another_spec_is_refused_and_changes_nothing(stores, source, spec):
    url = stores[source]  # not a copy: the refusal must leave it byte for byte as it was
    before = tree_hashes(url)
    have = SPEC if source == "subset" else "all"
    with pytest.raises(StoreMismatch, match=rf"targets='{have}' \(now '{spec}'\).*fix: rerun with the settings"):
        fit_store(url, replace(SUBSET_FIT if source == "subset" else FULL_FIT, targets=spec))
    assert tree_hashes(url) == before


def test_evaluate_refuses_a_subset_store(stores, tmp_path):
    with pytest.raises(MatchingError, match=r"datamodels for 60 of 500 points only .*fix: .*dmm fit --targets all"):
        attribution_stage({"url": stores["subset"], "source": "datamodels"}, tmp_path, {})
    assert not (tmp_path / "store.json").exists()


def test_trak_for_a_subset_equals_full_trak_at_its_ids(stores, tmp_path):
    url = copy_of(stores["all"], tmp_path)
    settings = replace(TRAK, checkpoints=1, target_chunk=40)  # one checkpoint: the claim holds for any C
    subset = trak.run_trak(AttributionStore.open(url, "r+"), settings, targets="random:50:1")
    assert subset.fitted_targets == 50 and subset.written == 2
    ids = parse_targets("random:50:1", N_POINTS).ids
    sub = AttributionStore.open(url).fit_group("trak")
    assert np.array_equal(sub.fitted_points(), ids) and sub.weight_rows.shape == (N_TRAIN, 50, 10)
    weight, bias = np.asarray(sub.weight[:]), np.asarray(sub.bias[:])
    assert weight.shape == (N_TRAIN, 50, 10) and np.count_nonzero(weight) > weight.size // 2
    shutil.rmtree(f"{url}/trak")
    trak.run_trak(AttributionStore.open(url, "r+"), replace(settings, target_chunk=N_POINTS))  # one chunk: faster
    full = AttributionStore.open(url).fit_group("trak")
    np.testing.assert_allclose(weight, np.asarray(full.weight[:])[:, ids], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(bias, full.bias[:][ids], rtol=1e-3, atol=1e-5)
