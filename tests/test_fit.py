"""`dmm fit` (cluster/fit.py): chunked Dask fit into the store, LDS, resume, refusal, Dask-on-Ray, CLI, layout,
the design shared by every chunk, the masks put once, --device and --max-task-memory.

One small store for the whole file: the class-balanced digits subset (300 train / 500 points) with
200 trained subset models and no datamodels; tests fit copies of it with a cheap solver.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import zarr
from sklearn.linear_model import Lasso
from zarr.storage import LocalStore

from attribution import fit_memory, lasso_stats
from attribution.datamodels import fit_target_chunk
from attribution.engine import train_batched
from attribution.errors import DmmError
from attribution.recipes import default_recipe
from attribution.store import AttributionStore
from attribution.subsets import block_subsets
from cluster.cli import main
from cluster import fit as fit_module
from cluster.fit import FitConfig, fit_store, resume_config

from fixtures_store import BLOCK_SIZE, MODEL, DigitsStore, digits_subset, np_margin, tree_hashes

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:lasso:RuntimeWarning")]  # max_iter=50 is cut short on purpose

NUM_MODELS = 200
# 500 points / 128 → 4 chunks, the last one partial (116 targets)
CONFIG = FitConfig(holdout_models=20, path_length=4, tol=1e-3, max_iter=50, targets_per_chunk=128)
CLI_FLAGS = {"--holdout-models": "20", "--path-length": "4", "--tol": "1e-3", "--max-iter": "50",
             "--targets-per-chunk": "128"}  # CONFIG's, as `dmm fit` flags


def fit_argv(url: str, changes: dict | None = None) -> list[str]:
    """`dmm fit` with CONFIG's settings, `changes` (flag: value) applied."""
    return ["fit", "--store", url, *(arg for item in {**CLI_FLAGS, **(changes or {})}.items() for arg in item)]
FIT_ARRAYS = ("weight", "bias", "lam", "lds", "lds_margin")


@pytest.fixture(autouse=True)
def _restore_zarr_threads():
    # `dmm fit` (cluster.commands_fit) sets zarr's decode pool to one thread for its process
    saved = zarr.config.get("threading.max_workers")
    yield
    zarr.config.set({"threading.max_workers": saved})


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> DigitsStore:
    """Subset models only (no datamodels): never modified, tests fit copies."""
    root = tmp_path_factory.mktemp("fit")
    data = digits_subset(root / "digits-subset.npz")
    fixture = DigitsStore(str(root / "subsets.zarr"), data, default_recipe("digits"))
    store = AttributionStore.open_or_create(fixture.url, fixture.spec(), NUM_MODELS)
    for block in store.missing_blocks():
        masks, seeds = block_subsets(0, block, BLOCK_SIZE, data.n_train, 0.5)
        store.write_block(block, masks, train_batched(MODEL, data, fixture.recipe, seeds, masks).logits.numpy())
    return fixture


def copy_of(base: DigitsStore, dest: Path) -> str:
    shutil.copytree(base.url, dest)
    return str(dest)


def counting_gram_rows(mp: pytest.MonkeyPatch) -> list[int]:
    """The number of mask rows of every XᵀX pass (`lasso_stats.gram_pass`) from now on."""
    rows, real = [], lasso_stats.gram_pass
    mp.setattr(lasso_stats, "gram_pass", lambda xtx, X: (rows.append(len(X)), real(xtx, X))[1])
    return rows


@pytest.fixture(scope="module")
def fitted(base, tmp_path_factory):
    """(url, report, rows of each XᵀX pass) of a copy fitted with local threads; treat it as read-only."""
    url = copy_of(base, tmp_path_factory.mktemp("fitted") / "s.zarr")
    with pytest.MonkeyPatch.context() as mp:
        rows = counting_gram_rows(mp)
        report = fit_store(url, CONFIG)
    return url, report, rows


def read_fit(url: str) -> dict[str, np.ndarray]:
    group = AttributionStore.open(url).fit_group("datamodels")
    return {name: np.asarray(getattr(group, name)[...]) for name in FIT_ARRAYS}


def lasso_objective(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, lam: float) -> float:
    """½‖y − b − Xw‖²/m + λ‖w‖₁ (scikit-learn's Lasso objective), in float64."""
    return 0.5 * np.mean((y - b - x @ w) ** 2) + lam * np.abs(w).sum()


def test_fit_writes_every_chunk_and_each_regression_is_sklearns_lasso_at_its_lambda(base, fitted):
    """A sampled stored (β, β0) minimises scikit-learn's Lasso objective on all 180 fitting models at the
    stored λ (the refit after λ is chosen) up to the cheap solver's tolerance (tol 1e-3, cut at 50
    iterations), with β0 the profiled intercept ȳ − x̄ᵀβ, and β = 0 exactly when λ ≥ λ_max = ‖X_cᵀy_c‖∞/m."""
    url, report, _ = fitted
    store = AttributionStore.open(url)
    group = store.fit_group("datamodels")
    assert group.num_chunks == 4 and group.is_complete()
    assert report["chunks_fitted"] == 4 and report["models"] == NUM_MODELS
    assert (report["fitting_models"], report["holdout_models"]) == (NUM_MODELS - 20, 20)
    got = read_fit(url)
    assert np.isfinite(got["lam"]).all() and np.isfinite(got["weight"]).all() and got["weight"].any()

    masks, logits, _ = store.read()
    x = masks[20:].astype(np.float64)
    rng = np.random.default_rng(0)
    for p, c in zip(rng.integers(0, 500, 12), rng.integers(0, 10, 12)):  # every chunk, the partial one too
        y, lam = logits[20:, p, c].astype(np.float64), float(got["lam"][p, c])
        w, b = got["weight"][:, p, c].astype(np.float64), float(got["bias"][p, c])
        ref = Lasso(alpha=lam, tol=1e-10, max_iter=100_000).fit(x, y)
        ours, best = lasso_objective(x, y, w, b, lam), lasso_objective(x, y, ref.coef_, ref.intercept_, lam)
        assert best * (1 - 1e-9) <= ours <= best * (1 + 5e-3), (p, c)
        assert b == pytest.approx(y.mean() - x.mean(0) @ w, abs=1e-5), (p, c)
        lam_max = np.abs((x - x.mean(0)).T @ (y - y.mean())).max() / len(y)
        assert (lam >= lam_max * (1 - 1e-4)) == (not w.any()), (p, c)


def spearman_or_zero(pred: np.ndarray, real: np.ndarray) -> float:
    """scipy's Spearman correlation; 0 for a constant prediction (an all-zero datamodel predicts nothing)."""
    return 0.0 if np.ptp(pred) == 0 else scipy.stats.spearmanr(pred, real).statistic


def test_stored_lds_is_spearman_over_the_held_out_models(base, fitted):
    url, report, _ = fitted
    store = AttributionStore.open(url)
    masks, logits, _ = store.read()
    hold_masks, hold_logits = masks[:20].astype(np.float64), logits[:20].astype(np.float64)
    got = read_fit(url)
    labels = base.data.all_labels().numpy()
    for x in (0, 7, 299, 300, 451, 499):  # train and held-out points, across chunks
        pred = hold_masks @ got["weight"][:, x, :].astype(np.float64) + got["bias"][x]  # (H, k)
        for c in range(10):
            np.testing.assert_allclose(got["lds"][x, c], spearman_or_zero(pred[:, c], hold_logits[:, x, c]), atol=1e-5)
        want = spearman_or_zero(np_margin(pred, labels[x]), np_margin(hold_logits[:, x], labels[x]))
        np.testing.assert_allclose(got["lds_margin"][x], want, atol=1e-5)
    n = base.data.n_train
    margin = got["lds_margin"][n:].astype(np.float64)
    summary = report["lds"]["held-out points, margin"]
    assert (summary["n"], summary["undefined"]) == (200, 0)  # all-zero datamodels count, as LDS 0
    assert summary["mean"] == pytest.approx(float(np.mean(margin)))
    assert summary["median"] == pytest.approx(float(np.median(margin)))
    assert summary["mean"] > 0.1  # real signal, not noise


def test_resume_fits_only_unmarked_chunks(base, fitted, tmp_path):
    url = str(tmp_path / "s.zarr")
    shutil.copytree(fitted[0], url)
    before = read_fit(url)
    AttributionStore.open(url, "r+").fit_group("datamodels").done[2] = False
    report = fit_store(url, CONFIG)
    assert report["chunks_fitted"] == 1
    after = read_fit(url)
    for name in FIT_ARRAYS:
        assert after[name].tobytes() == before[name].tobytes(), name
    digest = tree_hashes(Path(url))
    assert fit_store(url, CONFIG)["chunks_fitted"] == 0  # complete: refits nothing
    assert tree_hashes(Path(url)) == digest


def test_the_demo_and_the_evaluation_finish_a_group_with_the_settings_it_was_started_with(base, fitted, tmp_path):
    """`resume_config`: a group started under settings other than the defaults (CONFIG here, as a store fitted under
    an earlier default tolerance) is finished with its own, where the defaults are refused; no group, the defaults,
    with a small store's held-out share (NUM_MODELS = 200 keeps 100; a fifth below that)."""
    assert resume_config(base.url) == FitConfig()
    small = copy_of(base, tmp_path / "small.zarr")
    AttributionStore.open(small, "r+").zarr_array("subsets/done")[1:] = False  # one block of BLOCK_SIZE models left
    assert resume_config(small) == FitConfig(holdout_models=BLOCK_SIZE // 5)
    url = str(tmp_path / "s.zarr")
    shutil.copytree(fitted[0], url)
    before = read_fit(url)
    AttributionStore.open(url, "r+").fit_group("datamodels").done[2] = False
    digest = tree_hashes(Path(url))
    with pytest.raises(DmmError, match="path_length=4 \\(now 20\\)"):
        fit_store(url, FitConfig())
    assert tree_hashes(Path(url)) == digest
    assert resume_config(url) == CONFIG
    assert fit_store(url, resume_config(url))["chunks_fitted"] == 1
    after = read_fit(url)
    for name in FIT_ARRAYS:
        assert after[name].tobytes() == before[name].tobytes(), name


def test_rerun_with_other_settings_is_refused_and_writes_nothing(fitted, tmp_path, capsys):
    url = str(tmp_path / "s.zarr")
    shutil.copytree(fitted[0], url)
    digest = tree_hashes(Path(url))
    with pytest.raises(DmmError) as err:
        fit_store(url, replace(CONFIG, path_length=5))
    msg = str(err.value)
    assert "\n" not in msg and "path_length=4 (now 5)" in msg and "max_iter" not in msg
    for flag, value, named in [("--path-length", "5", "path_length=4 (now 5)"),
                               ("--tol", "1e-4", "tol=0.001 (now 0.0001)"), ("--max-iter", "60", "max_iter=50 (now 60)")]:
        assert main(fit_argv(url, {flag: value})) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dmm: error: datamodels/") and "\n" not in err and named in err
    for flag, value in [("--tol", "0"), ("--tol", "nan"), ("--max-iter", "0")]:  # refused before the store is opened
        assert main(fit_argv(url, {flag: value})) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--tol > 0 and --max-iter >= 1" in err
    assert tree_hashes(Path(url)) == digest


def test_every_chunk_shares_one_design_and_gets_the_bytes_of_a_design_of_its_own(base, fitted):
    """One XᵀX pass over the 180 fitting models for the 4 chunks (162 train rows, then the 18 validation rows
    added), and each chunk's β, β0, λ and LDS are the bytes `fit_target_chunk` gives with a design it builds
    itself (as every task did before the design was shared)."""
    url, _, rows = fitted
    assert rows == [162, 18]
    store = AttributionStore.open(url)
    masks, logits, _ = store.read()
    got, labels = read_fit(url), base.data.all_labels().numpy()
    for sl in (slice(128, 256), slice(384, 500)):  # a full chunk and the partial last one
        own = fit_target_chunk(masks[20:], logits[20:, sl], masks[:20], logits[:20, sl], labels[sl],
                               path_length=CONFIG.path_length, tol=CONFIG.tol, max_iter=CONFIG.max_iter)
        for name in FIT_ARRAYS:
            stored = got[name][:, sl] if name == "weight" else got[name][sl]
            assert stored.tobytes() == getattr(own, name).astype(np.float32).tobytes(), name  # as stored


def test_regressions_cut_short_are_counted_in_one_line_not_warned_per_chunk(base, tmp_path, capsys):
    """At --max-iter 2 most refits stop short: `dmm fit` raises no RuntimeWarning from its chunks (each would
    break the progress bar) and says once how many of its 500 · 10 regressions stopped, the sum of what
    `fit_target_chunk` counts chunk by chunk."""
    import re
    import warnings

    url = copy_of(base, tmp_path / "s.zarr")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(fit_argv(url, {"--max-iter": "2"})) == 0
    assert not [w for w in caught if "lasso" in str(w.message)]
    said = re.findall(r"^([\d,]+) of its 5,000 regressions stopped at --max-iter 2 before the duality gap reached "
                      r"--tol 0.001 \(their β is less exact; raise --max-iter or loosen --tol\)$",
                      capsys.readouterr().out, flags=re.M)
    store = AttributionStore.open(url)
    masks, logits, _ = store.read()
    labels = base.data.all_labels().numpy()
    expected = sum(fit_target_chunk(masks[20:], logits[20:, sl], masks[:20], logits[:20, sl], labels[sl],
                                    path_length=CONFIG.path_length, tol=CONFIG.tol, max_iter=2, warn=False).at_max_iter
                   for sl in (slice(j, j + 128) for j in range(0, 500, 128)))
    assert 0 < expected < 5_000 and said == [f"{expected:,}"]


def test_dask_on_ray_puts_the_masks_once_and_gives_the_threads_result(ray_session, base, fitted, tmp_path,
                                                                      monkeypatch):
    import ray

    puts, real_put = [], ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: (puts.append(value), real_put(value, **kw))[1])
    url = copy_of(base, tmp_path / "s.zarr")
    report = fit_store(url, CONFIG, address=ray_session)
    assert report["chunks_fitted"] == 4
    assert len(puts) == 1  # the masks, once for the design task and all 4 chunk tasks
    np.testing.assert_array_equal(puts[0], AttributionStore.open(url).read_masks())
    want, got = read_fit(fitted[0]), read_fit(url)
    for name in FIT_ARRAYS:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, equal_nan=True, err_msg=name)


def test_cli_prints_the_lds_summary(fitted, tmp_path, capsys):
    url = str(tmp_path / "s.zarr")
    shutil.copytree(fitted[0], url)
    AttributionStore.open(url, "r+").fit_group("datamodels").done[0] = False
    rc = main(fit_argv(url, {"--device": "cpu", "--max-task-memory": "0.04"}))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fitted 1 target chunks on 180 subset models; LDS on 20 held-out models:" in out
    line = next(s for s in out.splitlines() if "LDS held-out points, margin: mean" in s)
    assert f"mean {fitted[1]['lds']['held-out points, margin']['mean']:.3f}" in line
    for name in ("held-out points, per class", "train points, per class", "train points, margin"):
        assert f"LDS {name}: mean " in out and "q25" in out and "median" in out and "q75" in out


def test_cli_refuses_missing_or_empty_stores(base, tmp_path, capsys):
    empty = tmp_path / "empty.zarr"
    AttributionStore.open_or_create(str(empty), base.spec(), NUM_MODELS)  # no subset models
    missing = tmp_path / "missing.zarr"
    for path, words in ((empty, "no completed subset models"), (missing, "no attribution store")):
        assert main(["fit", "--store", str(path), "--holdout-models", "20"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dmm: error:") and "\n" not in err and words in err, err
    assert not missing.exists()
    assert not AttributionStore.open(str(empty)).has_fit_group("datamodels")


class RecordingStore(LocalStore):
    """A LocalStore that remembers the keys it was asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.keys_read: list[str] = []

    async def get(self, key, prototype=None, byte_range=None):
        self.keys_read.append(key)
        return await super().get(key, prototype, byte_range)


def test_weight_chunks_let_a_forget_set_read_only_its_rows(fitted):
    url, _, _ = fitted
    group = AttributionStore.open(url).fit_group("datamodels")
    n, p, k = group.weight.shape
    assert group.weight.chunks == (1, 128, k) and (n, p, k) == (300, 500, 10)
    assert group.bias.chunks == (128, k) and group.lds_margin.chunks == (128,)

    rows = [3, 41, 150, 151, 299]
    store = RecordingStore(url, read_only=True)
    weight = zarr.open_array(store, path="datamodels/weight", mode="r")
    got = weight.oindex[rows, :, :]
    np.testing.assert_array_equal(got, group.read_weight_rows(rows))
    chunk_keys = [key for key in store.keys_read if key.startswith("datamodels/weight/c/")]
    touched = {tuple(int(i) for i in key.split("/")[-3:]) for key in chunk_keys}
    assert touched == {(r, j, 0) for r in rows for j in range(4)}  # 5 rows × 4 target chunks, nothing else
    assert len(chunk_keys) == len(touched)


def test_device_and_memory_bound_are_refused_in_one_line_before_the_store_is_touched(base, tmp_path, capsys):
    """The chunk of 128 targets needs, by `fit_memory`'s formula (n = 300, 180 fitting models of which 18
    validate, t = 10 T regressions): shared 2·300²·4 + 180·300 = 774,000 B; chunk max(16·180·t, 80·300·t)
    + 18·300·4 + 1024·300·8 + 4·180·t = 2,479,200 + 24,720·t B. Under 0.02 GB that allows T ≤ 67."""
    url = copy_of(base, tmp_path / "s.zarr")
    digest = tree_hashes(Path(url))
    args = ["fit", "--store", url, "--holdout-models", "20", "--targets-per-chunk", "128"]
    cases = [(["--max-task-memory", "0.02"], "needs 0.0349 GB, over --max-task-memory 0.02 GB; "
                                             "fix: pass --targets-per-chunk 67 or less"),
             (["--max-task-memory", "0.0005"], "the shared design and masks alone need 0.000774 GB"),
             (["--max-task-memory", "-1"], "pass a positive size"),
             (["--device", "tpu"], "unknown device 'tpu'; use --device cpu")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "this machine has no CUDA GPU"))
    for extra, words in cases:
        assert main(args + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("dmm: error:") and "\n" not in err and words in err, err
    assert tree_hashes(Path(url)) == digest
    assert not AttributionStore.open(url).has_fit_group("datamodels")


def test_task_memory_at_cifar10_scale_is_the_stated_number():
    """n = 50,000 points, 50,000 models of which 100 held out and ⌈0.1·49,900⌉ = 4,990 validate, T = 256, k = 10:
    the shared Gram pair 2·50,000²·4 B = 20 GB, the masks 2.5 GB; the chunk 80·50,000·2,560 = 10.24 GB, plus X_val
    4,990·50,000·4 B, a row block 1,024·50,000·8 B and the logits 4·49,900·2,560 B (fit_memory's docstring)."""
    n, t, m_train, m_val = 50_000, 2_560, 44_910, 4_990
    assert fit_memory.shared_bytes(n, m_train, m_val) == 20_000_000_000 + 2_495_000_000
    assert fit_memory.chunk_bytes(n, t, m_train, m_val) == 10_240_000_000 + 998_000_000 + 409_600_000 + 510_976_000
    assert round(fit_memory.task_bytes(n, t, m_train, m_val) / 1e9, 1) == 34.7


def test_a_design_of_fewer_rows_than_half_the_points_is_counted_as_its_factor():
    """n = 1,000: 100 train + 20 val rows keep both factors, (100 + 120)·1,000·4 B, and the 120,000 B of masks;
    450 + 100 rows keep the train rows' factor (900 < 1,000) but the full G, 450·1,000·4 + 1,000²·4 + 550,000 B."""
    assert fit_memory.shared_bytes(1_000, 100, 20) == 880_000 + 120_000
    assert fit_memory.shared_bytes(1_000, 450, 100) == 1_800_000 + 4_000_000 + 550_000


def test_the_progress_bar_times_chunks_from_the_start_not_from_the_last_redraw(monkeypatch):
    """The watcher redraws every 0.5 s (update(0)); a chunk that took 41 s must read as 41 s, its ETA 7 × 41 s."""
    import tqdm.std

    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    with fit_module.chunk_bar(total=8, initial=0) as bar:
        for _ in range(82):
            now[0] += 0.5
            bar.update(0)
        now[0] += 0.25
        bar.update(1)
        assert bar.format_dict["elapsed"] == pytest.approx(41.25)
        assert "1/8 [00:41<04:48, 41.25s/chunk]" in str(bar)
