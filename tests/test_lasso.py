"""Tests for the batched L1 datamodel solver (attribution/lasso.py) and its shared design (lasso_stats.py)."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso

from attribution import lasso_stats
from attribution.lasso import (
    LassoFit,
    fit_datamodels,
    lambda_path,
    lasso_objective,
    solve_lasso,
)
from attribution.lasso_stats import build_design

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _problem(m=160, n=40, t=6, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    X = rng.random((m, n)) < 0.5  # raw 0/1 masks, as stored
    B = rng.normal(size=(n, t)) * (rng.random((n, t)) < 0.25)
    Y = 3.0 + X @ B + noise * rng.normal(size=(m, t))
    return X, Y.astype(np.float32)


def _lmax(X, Y):
    Xc = X - X.mean(0)
    Yc = Y - Y.mean(0)
    return np.abs(Xc.T @ Yc).max(0) / X.shape[0]


def _sk(X, y, lam, tol=1e-12):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = Lasso(alpha=float(lam), fit_intercept=True, tol=tol, max_iter=200_000)
        return est.fit(X.astype(np.float64), y.astype(np.float64))


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
def test_objective_matches_sklearn(dtype, rtol):
    X, Y = _problem()
    lam = _lmax(X, Y) * np.array([0.7, 0.3, 0.1, 0.05, 0.02, 0.005])
    W, b = solve_lasso(X, Y, lam, dtype=dtype)
    assert W.shape == (X.shape[1], Y.shape[1]) and W.dtype == np.float32
    assert b.shape == (Y.shape[1],) and b.dtype == np.float32
    ours = lasso_objective(X, Y, W, b, lam)
    ref = np.empty_like(ours)
    for j in range(Y.shape[1]):
        est = _sk(X, Y[:, j], lam[j])
        ref[j] = lasso_objective(X, Y[:, [j]], est.coef_[:, None], [est.intercept_], lam[[j]])[0]
    np.testing.assert_allclose(ours, ref, rtol=rtol)


def test_predictions_apply_to_raw_masks():
    X, Y = _problem(seed=1)
    lam = _lmax(X, Y) * 0.05
    W, b = solve_lasso(X, Y, lam)
    X_new = np.random.default_rng(7).random((50, X.shape[1])) < 0.5
    for j in range(Y.shape[1]):
        est = _sk(X, Y[:, j], lam[j])
        np.testing.assert_allclose(W[:, j], est.coef_, atol=2e-4)
        np.testing.assert_allclose(X_new @ W[:, j] + b[j], est.predict(X_new.astype(float)), atol=2e-3)


def test_lambda_max_gives_zero_weights_and_mean_bias():
    X, Y = _problem(seed=2)
    lmax = _lmax(X, Y)
    path = lambda_path(X, Y, path_length=5, min_ratio=1e-2)
    assert path.shape == (5, Y.shape[1])
    np.testing.assert_allclose(path[0], lmax, rtol=1e-6)
    assert np.all(np.diff(path, axis=0) < 0)
    np.testing.assert_allclose(path[-1], lmax * 1e-2, rtol=1e-6)
    for scale in (1.0, 3.0):
        W, b = solve_lasso(X, Y, lmax * scale)
        assert np.all(W == 0)
        np.testing.assert_allclose(b, Y.mean(0), rtol=1e-6)
    # just below λ_max something enters
    W, _ = solve_lasso(X, Y, lmax * 0.9)
    assert np.all((W != 0).sum(0) >= 1)


def test_warm_start_and_constant_target():
    X, Y = _problem(seed=3, t=3)
    Y = np.concatenate([Y, np.full((X.shape[0], 1), 2.5, np.float32)], axis=1)
    lam = np.maximum(_lmax(X, Y) * 0.05, 0.0)
    W, b = solve_lasso(X, Y, lam)
    assert np.all(W[:, -1] == 0) and b[-1] == pytest.approx(2.5)
    W2, b2 = solve_lasso(X, Y, lam, init=W + 0.1)
    f1 = lasso_objective(X, Y, W, b, lam)
    f2 = lasso_objective(X, Y, W2, b2, lam)
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-9)


def _brute_force(Xtr, Ytr, Xva, Yva, path_length, min_ratio):
    path = lambda_path(Xtr, Ytr, path_length, min_ratio)
    mse = np.empty_like(path)
    for j in range(Ytr.shape[1]):
        for k in range(path.shape[0]):
            est = _sk(Xtr, Ytr[:, j], path[k, j], tol=1e-10)
            mse[k, j] = np.mean((Yva[:, j] - est.predict(Xva.astype(float))) ** 2)
    return path, mse


@pytest.mark.parametrize("patience", [None, 4])
def test_chosen_lambda_matches_brute_force(patience):
    X, Y = _problem(m=260, n=40, t=8, seed=4, noise=2.0)
    Xtr, Ytr, Xva, Yva = X[:200], Y[:200], X[200:], Y[200:]
    L, ratio = 12, 1e-2
    path, mse = _brute_force(Xtr, Ytr, Xva, Yva, L, ratio)
    best = mse.argmin(0)
    fit = fit_datamodels(Xtr, Ytr, Xva, Yva, path_length=L, min_ratio=ratio, patience=patience)
    assert isinstance(fit, LassoFit)
    assert fit.weight.shape == (X.shape[1], Y.shape[1])
    for a in (fit.weight, fit.bias, fit.lam, fit.val_mse):
        assert a.dtype == np.float32
    np.testing.assert_allclose(fit.lam, path[best, np.arange(Y.shape[1])], rtol=1e-6)
    np.testing.assert_allclose(fit.val_mse, mse.min(0), rtol=1e-4)
    # refit on train + val at the chosen λ
    ours = lasso_objective(X, Y, fit.weight, fit.bias, fit.lam)
    for j in range(Y.shape[1]):
        est = _sk(X, Y[:, j], fit.lam[j])
        ref = lasso_objective(X, Y[:, [j]], est.coef_[:, None], [est.intercept_], fit.lam[[j]])[0]
        assert ours[j] == pytest.approx(ref, rel=1e-4)


def _one_line_error(fn, *words):
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_bad_input_raises_clear_errors():
    X, Y = _problem(t=2)
    lam = np.array([0.1, 0.1])
    _one_line_error(lambda: solve_lasso(X[:-1], Y, lam), "rows", "X", "Y")
    Ybad = Y.copy()
    Ybad[3, 1] = np.nan
    _one_line_error(lambda: solve_lasso(X, Ybad, lam), "NaN", "Y")
    Ybad[150, 1] = np.inf
    _one_line_error(lambda: fit_datamodels(X[:100], Y[:100], X[100:], Ybad[100:]), "Y_val")
    _one_line_error(lambda: solve_lasso(X, Y, np.array([0.1, -0.2])), "negative", "λ")
    _one_line_error(lambda: solve_lasso(X, Y, np.array([0.1, 0.1, 0.1])), "lam", "targets")
    _one_line_error(lambda: fit_datamodels(X[:100], Y[:100], X[100:, :-1], Y[100:]), "columns")
    _one_line_error(lambda: fit_datamodels(X[:100], Y[:100], X[100:], Y[100:, :1]), "targets")
    _one_line_error(lambda: lambda_path(X, Y, 0, 1e-2), "path_length")
    _one_line_error(lambda: lambda_path(X, Y, 10, 0.0), "min_ratio")
    _one_line_error(lambda: solve_lasso(X, Y, lam, dtype=torch.float16), "dtype")
    _one_line_error(lambda: solve_lasso(X, Y, lam, tol=-1.0), "tol")
    W = np.zeros((X.shape[1], 2), np.float32)
    _one_line_error(lambda: lasso_objective(X, Y, W.T, np.zeros(2), lam), "weight")
    _one_line_error(lambda: fit_datamodels(X[:100], Y[:100], X[100:], Y[100:], patience=0), "patience")


FIT_FIELDS = ("weight", "bias", "lam", "val_mse")


def test_shared_design_is_the_centred_gram_of_each_split():
    """G = X_cᵀX_c/m of the train rows and of train + val (numpy float64 reference, float32 rounding), the
    column sums exact, and L a bound 5 % above the top eigenvalue."""
    X, _ = _problem(m=300, n=40, seed=5)
    d = build_design(X[:250], X[250:])
    assert d.train.G.dtype == np.float32 and d.train.G.shape == (40, 40)
    for mo, Xs in ((d.train, X[:250]), (d.full, X)):
        Xc = Xs - Xs.mean(0)
        G = Xc.T @ Xc / len(Xs)
        assert mo.m == len(Xs) and np.array_equal(mo.colsum, Xs.sum(0).astype(np.float64))
        np.testing.assert_allclose(mo.G, G, rtol=0, atol=2e-7)
        top = np.linalg.eigvalsh(G)[-1]
        assert 1.04 * top < mo.L <= 1.05 * top + 1e-9


def test_refits_stopped_at_max_iter_are_flagged_and_warned_once():
    """`at_max_iter` marks the refits that stopped before their duality gap reached tol: after 1 iteration
    every target but the constant one (β = 0 at λ_max, converged at once), after enough none; one warning
    names the count, and none with warn=False."""
    X, Y = _problem(m=200, n=40, t=5, seed=12, noise=0.5)
    Y = np.concatenate([Y, np.full((200, 1), 2.5, np.float32)], axis=1)
    with pytest.warns(RuntimeWarning, match=r"^lasso: 5 target\(s\) hit max_iter=1 before the duality gap") as said:
        short = fit_datamodels(X[:160], Y[:160], X[160:], Y[160:], path_length=4, max_iter=1)
    assert len([w for w in said if "lasso" in str(w.message)]) == 1
    assert short.at_max_iter.tolist() == [True] * 5 + [False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not fit_datamodels(X[:160], Y[:160], X[160:], Y[160:], path_length=4).at_max_iter.any()
        quiet = fit_datamodels(X[:160], Y[:160], X[160:], Y[160:], path_length=4, max_iter=1, warn=False)
    assert quiet.at_max_iter.tolist() == short.at_max_iter.tolist()


def test_a_design_of_fewer_models_than_half_the_points_keeps_the_factor():
    """With 2m < n each moment keeps F = X_c/√m (m × n) instead of G: FᵀF is the centred Gram (numpy float64
    reference), and G·W − C through it is the dense product's. 30 + 10 rows of 100 points: both factored;
    45 + 15: the train rows' factor (90 < 100) and the full G (120 ≥ 100)."""
    X, _ = _problem(m=60, n=100, seed=10)
    for m_train, m_val, full_factored in ((30, 10, True), (45, 15, False)):
        d = build_design(X[:m_train], X[m_train:m_train + m_val])
        assert d.train.G is None and d.train.F.shape == (m_train, 100) and d.train.F.dtype == np.float32
        assert (d.full.F is not None) == full_factored and (d.full.G is None) == full_factored
        for mo, Xs in ((d.train, X[:m_train]), (d.full, X[:m_train + m_val])):
            Xc = Xs - Xs.mean(0)
            G = Xc.T @ Xc / len(Xs)
            gram, _ = mo.on(torch.device("cpu"))
            W, C = torch.randn(100, 3, dtype=torch.float32), torch.randn(100, 3, dtype=torch.float32)
            np.testing.assert_allclose(gram.grad(W, C).numpy(), G @ W.numpy() - C.numpy(), rtol=0, atol=2e-5)
            if mo.F is not None:
                np.testing.assert_allclose(mo.F.astype(np.float64).T @ mo.F, G, rtol=0, atol=2e-7)
            top = np.linalg.eigvalsh(G)[-1]
            assert 1.04 * top < mo.L <= 1.05 * top * (1 + 1e-6)  # the power iteration in float32


def test_the_factored_design_fits_what_the_dense_one_does(monkeypatch):
    """Fewer models than points (30 train + 10 val of 100): the objective is sklearn's at every λ, and the whole
    fit — path, chosen λ, refit — is the dense Gram's (forced) to the solver's tolerance."""
    X, Y = _problem(m=40, n=100, t=5, seed=11, noise=0.5)
    lam = _lmax(X, Y) * np.array([0.5, 0.2, 0.1, 0.05, 0.02])
    W, b = solve_lasso(X, Y, lam, dtype=torch.float64, tol=1e-12, max_iter=100_000)
    ref = [lasso_objective(X, Y[:, [j]], (e := _sk(X, Y[:, j], lam[j])).coef_[:, None], [e.intercept_], lam[[j]])[0]
           for j in range(Y.shape[1])]
    np.testing.assert_allclose(lasso_objective(X, Y, W, b, lam), ref, rtol=1e-8)
    kwargs = dict(path_length=8, dtype=torch.float64, tol=1e-12, max_iter=100_000)
    factored_fit = fit_datamodels(X[:30], Y[:30], X[30:], Y[30:], **kwargs)
    monkeypatch.setattr(lasso_stats, "factored", lambda m, n: False)
    assert build_design(X[:30], X[30:]).train.F is None
    dense_fit = fit_datamodels(X[:30], Y[:30], X[30:], Y[30:], **kwargs)
    np.testing.assert_array_equal(factored_fit.lam, dense_fit.lam)
    for f in FIT_FIELDS:
        np.testing.assert_allclose(getattr(factored_fit, f), getattr(dense_fit, f), rtol=1e-5, atol=1e-6, err_msg=f)


def test_row_blocks_change_no_bit_of_the_gram_and_the_fit(monkeypatch):
    """XᵀX of 0/1 masks is exact in float32 in any order, so 7-row blocks give the single GEMM's bytes; X_cᵀY_c
    is summed in float64 per block, so the fit may move by float rounding (measured: not at all here)."""
    X, Y = _problem(m=260, n=40, t=8, seed=6, noise=2.0)
    one = build_design(X[:200], X[200:])
    fit_one = fit_datamodels(X[:200], Y[:200], X[200:], Y[200:], path_length=8)
    monkeypatch.setattr(lasso_stats, "ROW_BLOCK", 7)
    blocked = build_design(X[:200], X[200:])
    assert blocked.train.G.tobytes() == one.train.G.tobytes() and blocked.full.G.tobytes() == one.full.G.tobytes()
    fit_blocked = fit_datamodels(X[:200], Y[:200], X[200:], Y[200:], path_length=8)
    for f in FIT_FIELDS:
        np.testing.assert_allclose(getattr(fit_blocked, f), getattr(fit_one, f), rtol=1e-6, atol=1e-7, err_msg=f)


def test_a_shared_design_gives_each_chunk_the_bytes_of_its_own_and_is_built_once(monkeypatch):
    X, Y = _problem(m=260, n=40, t=8, seed=7, noise=2.0)
    Xtr, Xva = X[:200], X[200:]
    rows = []
    real = lasso_stats.gram_pass
    monkeypatch.setattr(lasso_stats, "gram_pass", lambda xtx, Xs: (rows.append(len(Xs)), real(xtx, Xs))[1])
    design = build_design(Xtr, Xva)
    assert sum(rows) == 260  # one pass of XᵀX over the masks' rows
    for cols in (slice(0, 3), slice(3, 8)):  # two target chunks on one design
        rows.clear()
        shared = fit_datamodels(Xtr, Y[:200, cols], Xva, Y[200:, cols], path_length=8, design=design,
                                device=torch.device("cpu"))
        assert rows == []
        own = fit_datamodels(Xtr, Y[:200, cols], Xva, Y[200:, cols], path_length=8)
        assert sum(rows) == 260
        for f in FIT_FIELDS:
            assert getattr(shared, f).tobytes() == getattr(own, f).tobytes(), f


def test_a_design_of_other_masks_or_dtype_is_refused():
    """A shared design is used only with the masks and dtype it was built from: one flipped mask, fewer train
    rows, other validation rows, no validation rows or another dtype each get their own one-line error."""
    X, Y = _problem(m=260, n=40, t=2, seed=8)
    Xtr, Xva, Ytr, Yva = X[:200], X[200:], Y[:200], Y[200:]
    design = build_design(Xtr, Xva)
    flipped = Xtr.copy()
    flipped[0] = ~flipped[0]
    other_masks = r"^the shared design \(200 train models × 40 points\) was built from other masks; rebuild it"
    cases = [
        (dict(X_train=flipped, Y_train=Ytr, X_val=Xva, Y_val=Yva, design=design), other_masks),
        (dict(X_train=Xtr[:150], Y_train=Ytr[:150], X_val=Xva, Y_val=Yva, design=design), other_masks),
        (dict(X_train=Xtr, Y_train=Ytr, X_val=X[150:210], Y_val=Y[150:210], design=design), other_masks),
        (dict(X_train=Xtr, Y_train=Ytr, X_val=Xva, Y_val=Yva, design=build_design(Xtr)),
         r"^the shared design has no validation rows; build it with build_design\(X_train, X_val\)$"),
        (dict(X_train=Xtr, Y_train=Ytr, X_val=Xva, Y_val=Yva, design=design, dtype=torch.float64),
         r"^the shared design is in torch.float32, the fit in torch.float64; build it in the fit's dtype$"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as refused:
            fit_datamodels(**kwargs)
        assert "\n" not in str(refused.value)
    assert fit_datamodels(Xtr, Ytr, Xva, Yva, design=design).weight.shape == (40, 2)  # its own masks: accepted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_solver_on_a_gpu_matches_the_cpu():
    X, Y = _problem(m=260, n=40, t=8, seed=9, noise=2.0)
    cpu = fit_datamodels(X[:200], Y[:200], X[200:], Y[200:], path_length=8, dtype=torch.float64)
    design = build_design(X[:200], X[200:], dtype=torch.float64, device="cuda")
    gpu = fit_datamodels(X[:200], Y[:200], X[200:], Y[200:], path_length=8, dtype=torch.float64,
                         design=design, device="cuda")
    np.testing.assert_allclose(gpu.lam, cpu.lam, rtol=1e-9)
    np.testing.assert_allclose(gpu.weight, cpu.weight, rtol=0, atol=1e-5)
    np.testing.assert_allclose(gpu.bias, cpu.bias, rtol=0, atol=1e-5)
