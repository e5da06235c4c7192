"""Batched L1-regularised datamodel solver (DESIGN.md §1, step 1).

For one chunk of targets that share a design (the subset masks), fit per target

    β_j, β0_j = argmin_{w, b}  ½‖y_j − b − X w‖² / m  +  λ_j ‖w‖₁          (1)

where X (m × n) holds the 0/1 masks of the m subset models S_1..S_m and y_j
(m,) is one target (a (point, class) logit or a margin) evaluated on those
models.  This is the datamodels regression of Ilyas et al. 2022 (β in the
paper, fit there with ``fast_l1``); λ is selected per target on held-out
subset models, then the model is refit on train + validation at that λ.

Algorithm (why it looks like this)
----------------------------------
* The intercept is profiled out by centring: with x̄, ȳ the column means,
  (1) is the same problem as ½‖y_c − X_c w‖²/m + λ‖w‖₁ and b = ȳ − x̄ᵀw.  This is
  exactly scikit-learn's ``Lasso(alpha=λ, fit_intercept=True)`` objective.
  No scaling of the columns is done, so the weights apply to raw 0/1 masks.
* All targets of a chunk share X, so everything is done on sufficient
  statistics: G = X_cᵀX_c/m (n × n, one GEMM per chunk call; XᵀX of 0/1 masks
  is exact in float32), C = X_cᵀY_c/m (n × t, float64) and ‖y_c‖²/m.  After
  that one iteration for *all* targets is a single G @ W GEMM (n²t flops,
  BLAS-3, near peak on 2 cores), instead of per-target coordinate descent over
  the m × n design with level-1 BLAS.  Memory is O(n² + n·t): it scales with
  the chunk, not with the total number of targets.
* Solver: FISTA (accelerated proximal gradient) in torch with, per target,
  - its own step 1/L_j, adapted every iteration (shrunk towards the observed
    curvature dᵀGd/‖d‖², doubled when the sufficient-decrease test fails; a
    failing step is rejected rather than recomputed).  The curvature on a
    sparse support is far below ‖G‖₂ (≈0.3 vs 0.85 for α = 0.5 masks), so this
    is several times faster than the global Lipschitz step.  The test needs
    dᵀGd, which costs no GEMM because the gradients at W and at the momentum
    point Z are kept up to date by linearity (∇f(Z) = ∇f(W⁺) + β(∇f(W⁺) − ∇f(W)));
  - a cold start by exact line search along S(c, λ) (soft-thresholded
    correlations), function-value adaptive restart of the momentum
    (O'Donoghue & Candès);
  - the duality gap as stopping rule (dual point θ = s·r/m, s = min(1,
    λ/‖X_cᵀr/m‖∞)), evaluated every iteration without extra GEMM: a target
    stops when gap ≤ tol·P (P = primal objective, so tol bounds the relative
    suboptimality), or at the arithmetic floor of the dtype (≈ 30·eps·‖y_c‖²/m;
    only reached for nearly noiseless targets — use ``dtype=torch.float64``);
  - finished targets leave the batch (columns compacted once ≥ 1/8 of the
    batch has finished), so the GEMM shrinks as targets converge.
* λ path: per target λ_max = ‖X_cᵀy_c‖∞/m (the smallest λ with β = 0), then a
  geometric grid down to λ_max·min_ratio (defaults: 20 points, min_ratio 1e-2
  as the ``eps`` ratio of fast_l1), solved in order with warm starts
  extrapolated along the path (on a fixed support β(λ) is affine in λ).
  Validation MSE on the held-out models is computed at every λ and the best λ
  per target kept (ties → the larger λ).  A target leaves the path after
  ``patience`` (default 4) consecutive λ without a better validation MSE —
  the small-λ end is dense and ill-conditioned, and this skips most of it;
  ``patience=None`` walks the whole grid (exact brute-force equivalent).
  The refit on train + val at the chosen λ starts from the train solution;
  its statistics are assembled from the train ones (no second n²m GEMM).

Everything runs in ``dtype`` (float32 by default); per-target scalars of the
objective/gap are combined in float64.  Returned arrays are float32.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "LassoFit",
    "lambda_path",
    "solve_lasso",
    "lasso_objective",
    "fit_datamodels",
    "DEFAULT_PATH_LENGTH",
    "DEFAULT_MIN_RATIO",
    "DEFAULT_TOL",
    "DEFAULT_MAX_ITER",
    "DEFAULT_PATIENCE",
]

DEFAULT_PATH_LENGTH = 20
DEFAULT_MIN_RATIO = 1e-2
DEFAULT_TOL = 1e-5  # relative duality gap: gap ≤ tol · objective
DEFAULT_MAX_ITER = 2000
DEFAULT_PATIENCE = 4  # stop a target's path after this many λ without a better val MSE

# diagnostics: number of target-columns pushed through G @ W (1 unit = one n² matvec)
_WORK = {"cols": 0}


@dataclass
class LassoFit:
    """Fitted datamodels for one chunk of t targets.

    weight: (n, t) float32, β; applies to raw 0/1 masks.
    bias:   (t,) float32, β0; prediction for a mask x is x @ weight + bias.
    lam:    (t,) float32, chosen λ per target.
    val_mse:(t,) float32, validation MSE at the chosen λ (train-only fit).
    """

    weight: np.ndarray
    bias: np.ndarray
    lam: np.ndarray
    val_mse: np.ndarray


# --------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------


def _as_2d(a, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim == 1 and name.startswith("Y"):
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}; pass a (models, …) array")
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise ValueError(f"{name} has non-numeric dtype {a.dtype}; pass a numeric or bool array")
    return a


def _check_xy(X, Y, xname: str = "X", yname: str = "Y", n: int | None = None):
    X = _as_2d(X, xname)
    Y = _as_2d(Y, yname)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"{xname} has {X.shape[0]} rows but {yname} has {Y.shape[0]}; "
            f"both need one row per subset model"
        )
    if X.shape[0] < 2:
        raise ValueError(f"{xname} has {X.shape[0]} rows; need at least 2 subset models")
    if n is not None and X.shape[1] != n:
        raise ValueError(
            f"{xname} has {X.shape[1]} columns but the training design has {n}; "
            f"use the same training points for every split"
        )
    if X.dtype != np.bool_ and not np.isfinite(X).all():
        raise ValueError(f"{xname} contains NaN or inf; masks must be finite 0/1 values")
    if not np.isfinite(Y).all():
        bad = np.flatnonzero(~np.isfinite(Y).all(axis=0))
        raise ValueError(
            f"{yname} contains NaN or inf in {bad.size} target column(s) (first: {bad[0]}); "
            f"drop or repair those targets before fitting"
        )
    return X, Y


def _check_lam(lam, t: int) -> np.ndarray:
    lam = np.asarray(lam.detach().cpu().numpy() if isinstance(lam, torch.Tensor) else lam,
                     dtype=np.float64)
    if lam.ndim == 0:
        lam = np.full(t, float(lam))
    if lam.shape != (t,):
        raise ValueError(f"lam has shape {lam.shape} but there are {t} targets; pass one λ per target")
    if not np.isfinite(lam).all():
        raise ValueError("lam contains NaN or inf; pass finite λ ≥ 0")
    if (lam < 0).any():
        raise ValueError(f"lam has {(lam < 0).sum()} negative value(s); λ must be ≥ 0")
    return lam


def _check_opts(tol, max_iter, dtype) -> None:
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol={tol}; pass a finite relative duality-gap tolerance ≥ 0, e.g. 1e-5")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter={max_iter}; pass an integer ≥ 1")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype}; use torch.float32 or torch.float64")


def _to_torch(a: np.ndarray, dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


# --------------------------------------------------------------------------
# sufficient statistics
# --------------------------------------------------------------------------


@dataclass
class _Stats:
    """Centred second moments of one design and its targets."""

    m: int
    colsum: torch.Tensor  # (n,)   Σ_i x_i (float64)
    xtx: torch.Tensor  # (n, n) XᵀX, raw (dtype)
    xbar: torch.Tensor  # (n,) float64
    ybar: torch.Tensor  # (t,) float64
    G: torch.Tensor  # (n, n) X_cᵀX_c/m  (dtype)
    C: torch.Tensor  # (n, t) X_cᵀY_c/m  (dtype)
    C64: torch.Tensor  # (n, t) the same in float64
    yy: torch.Tensor  # (t,) ‖y_c‖²/m    (float64)
    L: float  # largest eigenvalue of G (estimate, slightly above)


def _gram_from(xtx: torch.Tensor, colsum: torch.Tensor, m: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    xbar = colsum / m
    G = xtx.double() / m - torch.outer(xbar, xbar)
    return G.to(dtype), xbar


def _top_eig(G: torch.Tensor, iters: int = 40) -> float:
    """Largest eigenvalue of the PSD matrix G by block power iteration."""
    n = G.shape[0]
    if n == 0:
        return 0.0
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(n, min(4, n), generator=gen, dtype=G.dtype)
    for _ in range(iters):
        V, _ = torch.linalg.qr(G @ V)
    H = V.T @ (G @ V)
    lam = float(torch.linalg.eigvalsh(H.double())[-1])
    return max(lam, 0.0) * 1.05 + 1e-12


def _stats(Xt: torch.Tensor, Y: np.ndarray, dtype) -> _Stats:
    m = Xt.shape[0]
    colsum = Xt.sum(0, dtype=torch.float64)
    xtx = Xt.T @ Xt
    G, xbar = _gram_from(xtx, colsum, m, dtype)
    Yd = torch.from_numpy(np.ascontiguousarray(Y)).double()
    ybar = Yd.mean(0)
    Yc = Yd - ybar
    yy = (Yc * Yc).sum(0) / m
    # float64 here so that λ ≥ λ_max = ‖C‖∞ gives exactly β = 0 after rounding
    # (rounding is monotone); Σ Y_c = 0, so the x̄ term vanishes
    C64 = (Xt.T.double() @ Yc) / m
    return _Stats(m, colsum, xtx, xbar, ybar, G, C64.to(dtype), C64, yy, _top_eig(G))


def _stats_merge(a: _Stats, Xv: torch.Tensor, Yv: np.ndarray, dtype) -> _Stats:
    """Statistics of the concatenation [train; val] from the train ones."""
    mv = Xv.shape[0]
    m = a.m + mv
    colsum = a.colsum + Xv.sum(0, dtype=torch.float64)
    xtx = a.xtx + Xv.T @ Xv
    G, xbar = _gram_from(xtx, colsum, m, dtype)
    Yvd = torch.from_numpy(np.ascontiguousarray(Yv)).double()
    ybar = (a.ybar * a.m + Yvd.sum(0)) / m
    shift = a.ybar - ybar  # (t,)
    Yvc = Yvd - ybar
    # Xᵀ(Y − ȳ_all) over both parts; train part = m_a C_a + colsum_a ⊗ (ȳ_a − ȳ_all)
    C = (a.C64 * a.m + torch.outer(a.colsum, shift) + (Xv.T.double() @ Yvc)) / m
    yy = (a.yy * a.m + a.m * shift**2 + (Yvc * Yvc).sum(0)) / m
    return _Stats(m, colsum, xtx, xbar, ybar, G, C.to(dtype), C, yy, _top_eig(G))


# --------------------------------------------------------------------------
# the batched solver on statistics
# --------------------------------------------------------------------------


def _soft(U: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    # sign(u)·max(|u| − thr, 0) with a per-column threshold
    return U - torch.clamp(U, min=-thr, max=thr)


def _fista(G, C, yy, lam, W0, *, tol, max_iter, L_max, L_init=None):
    """Solve min_w ½wᵀGw − cᵀw + λ‖w‖₁ (+ ½yy) for every column.

    G (n,n), C (n,t), yy (t,) float64, lam (t,) float64, W0 (n,t) or None,
    L_init (t,) float64 or None: per-target step guesses (e.g. from the
    previous λ on the path).  Returns W (n,t) in G.dtype, the final duality
    gap (t,) float64, iterations (t,) and the final L (t,).
    """
    n, t = C.shape
    dtype = G.dtype
    eps = torch.finfo(dtype).eps
    W_out = torch.zeros(n, t, dtype=dtype) if W0 is None else W0.to(dtype).clone()
    gap_out = torch.zeros(t, dtype=torch.float64)
    it_out = torch.zeros(t, dtype=torch.long)
    L_out = torch.full((t,), 0.5 * L_max, dtype=torch.float64)
    if L_init is not None:
        L_out = L_init.clone().to(torch.float64).clamp(1e-3 * L_max, L_max)
    if t == 0 or n == 0 or max_iter < 1:
        return W_out, gap_out, it_out, L_out

    idx = torch.arange(t)
    c = C
    lam64 = lam.to(torch.float64).clone()
    lamd = lam64.to(dtype)
    y2 = yy.clone()
    L = L_out.clone()
    L_floor = 1e-3 * L_max
    if W0 is None:
        # exact line search along the soft-thresholded correlation: w = a·S(c, λ)
        Dd = _soft(c, lamd)
        GD = G @ Dd
        _WORK["cols"] += t
        dGd = torch.linalg.vecdot(Dd, GD, dim=0).double()
        dd = torch.linalg.vecdot(Dd, Dd, dim=0).double()
        num = torch.linalg.vecdot(c, Dd, dim=0).double() - lam64 * Dd.abs().sum(0).double()
        ok = dGd > 0
        a = torch.where(ok, num / dGd.clamp_min(1e-300), torch.zeros_like(num)).clamp_min(0)
        if L_init is None:
            L = torch.where(ok, dGd / dd.clamp_min(1e-300), L).clamp(L_floor, L_max)
        W = Dd * a.to(dtype)
        gW = torch.addcmul(-c, GD, a.to(dtype))
    else:
        W = W_out.clone()
        gW = torch.addmm(c, G, W, beta=-1)
        _WORK["cols"] += t
    Z, gZ = W, gW
    theta = torch.ones(t, dtype=torch.float64)
    P_prev = torch.full((t,), float("inf"), dtype=torch.float64)
    fin = torch.zeros(t, dtype=torch.bool)
    gap_fin = torch.zeros(t, dtype=torch.float64)
    it_fin = torch.zeros(t, dtype=torch.long)
    floor_coef = 30.0 * eps

    for it in range(1, max_iter + 1):
        # ---- proximal step from Z with per-target step 1/L (backtracking) ----
        inv = (1.0 / L).to(dtype)
        Wn = torch.addcmul(Z, gZ, -inv)  # gradient step, then soft-threshold in place
        thr = lamd * inv
        Wn.sub_(torch.clamp(Wn, min=-thr, max=thr))
        gWn = torch.addmm(c, G, Wn, beta=-1)
        _WORK["cols"] += Wn.shape[1]
        D = Wn - Z
        dGd = torch.linalg.vecdot(D, gWn - gZ, dim=0).double()
        dd = torch.linalg.vecdot(D, D, dim=0).double()
        del D
        # sufficient decrease f(w⁺) ≤ f(z) + ∇f(z)ᵀd + (L/2)‖d‖²  ⇔  dᵀGd ≤ L‖d‖²
        curv = dGd / dd.clamp_min(1e-300)
        bad = (dGd > L * dd * (1 + 1e-4)) & (L < L_max)
        if bool(bad.any()):
            # step too long for these targets: reject it (stay at W, restart the
            # momentum) and retry next iteration with a larger L — no extra GEMM
            L = torch.where(bad, torch.maximum(2.0 * L, 1.1 * curv).clamp_max(L_max), L)
            Wn = torch.where(bad, W, Wn)
            gWn = torch.where(bad, gW, gWn)
        # next guess: shrink towards the curvature seen along this step
        grow = (dd > 0) & ~bad
        L = torch.where(grow, torch.maximum(0.8 * L, curv), L).clamp_min(L_floor)

        # ---- objective and duality gap (θ = s·r/m) ----
        cw = torch.linalg.vecdot(c, Wn, dim=0).double()
        wgw = torch.linalg.vecdot(Wn, gWn, dim=0).double() + cw  # wᵀGw
        P = 0.5 * y2 - cw + 0.5 * wgw + lam64 * Wn.abs().sum(0).double()
        gmax = gWn.abs().amax(0).double()
        s = torch.where(gmax > lam64, lam64 / gmax.clamp_min(1e-300), torch.ones_like(gmax))
        dual = s * (y2 - cw) - 0.5 * s * s * (y2 - 2 * cw + wgw)
        gap = P - dual
        done = gap <= tol * P.abs() + floor_coef * (y2 + cw.abs() + wgw.abs())

        # ---- momentum with function-value restart ----
        restart = (P > P_prev) | bad
        theta_n = 0.5 * (1 + torch.sqrt(1 + 4 * theta * theta))
        beta = torch.where(restart, torch.zeros_like(theta), (theta - 1) / theta_n)
        theta = torch.where(restart, torch.ones_like(theta_n), theta_n)
        bt = beta.to(dtype)
        Z = torch.addcmul(Wn, bt, Wn - W)
        gZ = torch.addcmul(gWn, bt, gWn - gW)
        W, gW, P_prev = Wn, gWn, P

        # finished targets stay in the batch until enough of them have piled up:
        # compacting (n,t) column gathers costs about as much as a GEMM on them
        newly = done & ~fin
        if bool(newly.any()):
            fin |= newly
            gap_fin[newly] = gap[newly]
            it_fin[newly] = it
        n_fin = int(fin.sum())
        if (n_fin and (n_fin * 8 >= fin.numel() or n_fin == fin.numel())) or it == max_iter:
            if it == max_iter:
                n_left = int((~fin).sum())
                if n_left:
                    warnings.warn(
                        f"lasso: {n_left} target(s) hit max_iter={max_iter} before the duality gap "
                        f"reached tol={tol:g}; raise max_iter or loosen tol",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                gap_fin[~fin] = gap[~fin]
                it_fin[~fin] = it
                fin[:] = True
            fi = fin.nonzero().squeeze(1)
            W_out.index_copy_(1, idx[fi], W.index_select(1, fi))
            gap_out[idx[fi]] = gap_fin[fi]
            it_out[idx[fi]] = it_fin[fi]
            L_out[idx[fi]] = L[fi]
            keep = (~fin).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            idx = idx[keep]
            W, gW, Z, gZ, c = (a.index_select(1, keep) for a in (W, gW, Z, gZ, c))
            lam64, lamd, y2, L, theta, P_prev, fin, gap_fin, it_fin = (
                a[keep] for a in (lam64, lamd, y2, L, theta, P_prev, fin, gap_fin, it_fin)
            )
    return W_out, gap_out, it_out, L_out

# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def lambda_path(X, Y, path_length: int = DEFAULT_PATH_LENGTH, min_ratio: float = DEFAULT_MIN_RATIO) -> np.ndarray:
    """Per-target decreasing λ grid, shape (path_length, t), float64.

    Row 0 is λ_max = ‖X_cᵀy_c‖∞/m (smallest λ with all-zero β); the grid is
    geometric down to λ_max·min_ratio.
    """
    if int(path_length) < 1:
        raise ValueError(f"path_length={path_length}; need at least 1 λ on the path")
    if not (0 < min_ratio <= 1):
        raise ValueError(f"min_ratio={min_ratio}; pick a ratio in (0, 1], e.g. 1e-2")
    X, Y = _check_xy(X, Y)
    Xt = _to_torch(X, torch.float64)
    Yd = torch.from_numpy(np.ascontiguousarray(Y)).double()
    C = (Xt.T @ (Yd - Yd.mean(0))) / X.shape[0]
    return _path_from_C(C, int(path_length), float(min_ratio))


def _path_from_C(C: torch.Tensor, path_length: int, min_ratio: float) -> np.ndarray:
    lmax = C.abs().amax(0).double().numpy() if C.shape[0] else np.zeros(C.shape[1])
    if path_length == 1:
        ratios = np.ones(1)
    else:
        ratios = min_ratio ** (np.arange(path_length) / (path_length - 1))
    return ratios[:, None] * lmax[None, :]


def _bias(st: _Stats, W: torch.Tensor) -> torch.Tensor:
    return st.ybar - st.xbar @ W.double()


def solve_lasso(
    X,
    Y,
    lam,
    *,
    init=None,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    dtype=torch.float32,
):
    """Solve (1) for every target at a fixed λ: returns (β, β0) per target.

    X: (m, n) 0/1 masks (bool/int/float); Y: (m, t) targets; lam: (t,) or a
    scalar, λ ≥ 0.  init: optional (n, t) warm start for β.  tol: stop a
    target when its duality gap ≤ tol × its objective (a bound on the
    relative suboptimality).  dtype: compute dtype (float32 default).
    Returns (weight (n, t) float32, bias (t,) float32): x @ weight + bias
    predicts Y for a raw 0/1 mask x.
    """
    _check_opts(tol, max_iter, dtype)
    X, Y = _check_xy(X, Y)
    n, t = X.shape[1], Y.shape[1]
    lam = _check_lam(lam, t)
    if init is not None:
        init = np.asarray(init.detach().cpu().numpy() if isinstance(init, torch.Tensor) else init)
        if init.shape != (n, t):
            raise ValueError(f"init has shape {init.shape}; expected (n, t) = {(n, t)}")
        if not np.isfinite(init).all():
            raise ValueError("init contains NaN or inf; pass a finite warm start or None")
    st = _stats(_to_torch(X, dtype), Y, dtype)
    W, _, _, _ = _fista(
        st.G, st.C, st.yy, torch.from_numpy(lam),
        None if init is None else _to_torch(init, dtype),
        tol=tol, max_iter=max_iter, L_max=st.L,
    )
    b = _bias(st, W)
    return W.float().numpy(), b.float().numpy()


def lasso_objective(X, Y, weight, bias, lam) -> np.ndarray:
    """Per-target ½‖y − b − Xw‖²/m + λ‖w‖₁, computed in float64 from residuals."""
    X, Y = _check_xy(X, Y)
    t = Y.shape[1]
    lam = _check_lam(lam, t)
    W = np.asarray(weight, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    if W.ndim == 1 and t == 1:
        W = W[:, None]
    if W.shape != (X.shape[1], t) or b.size != t:
        raise ValueError(
            f"weight {W.shape} / bias {b.shape} do not match (n, t) = {(X.shape[1], t)}; "
            f"pass weight (n, t) and bias (t,)"
        )
    b = b.reshape(t)
    R = Y.astype(np.float64) - b - X.astype(np.float64) @ W
    return 0.5 * (R * R).sum(0) / X.shape[0] + lam * np.abs(W).sum(0)


def fit_datamodels(
    X_train,
    Y_train,
    X_val,
    Y_val,
    *,
    path_length: int = DEFAULT_PATH_LENGTH,
    min_ratio: float = DEFAULT_MIN_RATIO,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    patience: int | None = DEFAULT_PATIENCE,
    dtype=torch.float32,
) -> LassoFit:
    """Datamodels for one chunk: λ path on train, λ chosen on val, refit on all.

    X_*: (m_*, n) 0/1 masks of the subset models (train / held-out models);
    Y_*: (m_*, t) the t targets on those models (same columns in both).
    path_length/min_ratio: the per-target grid (see ``lambda_path``).
    tol/max_iter/dtype: as in ``solve_lasso`` (used for every λ and the refit).
    patience: a target stops walking the path after this many λ without a
    better validation MSE; None walks the whole grid.
    Returns a ``LassoFit`` (β = weight, β0 = bias, chosen λ, its val MSE).
    """
    _check_opts(tol, max_iter, dtype)
    X_train, Y_train = _check_xy(X_train, Y_train, "X_train", "Y_train")
    n, t = X_train.shape[1], Y_train.shape[1]
    X_val, Y_val = _check_xy(X_val, Y_val, "X_val", "Y_val", n=n)
    if Y_val.shape[1] != t:
        raise ValueError(
            f"Y_val has {Y_val.shape[1]} targets but Y_train has {t}; pass the same target columns"
        )
    if int(path_length) < 1:
        raise ValueError(f"path_length={path_length}; need at least 1 λ on the path")
    if not (0 < min_ratio <= 1):
        raise ValueError(f"min_ratio={min_ratio}; pick a ratio in (0, 1], e.g. 1e-2")
    if patience is not None and int(patience) < 1:
        raise ValueError(f"patience={patience}; use an integer ≥ 1, or None for the whole path")

    Xt = _to_torch(X_train, dtype)
    Xv = _to_torch(X_val, dtype)
    st = _stats(Xt, Y_train, dtype)
    path = torch.from_numpy(_path_from_C(st.C64, int(path_length), float(min_ratio)))
    Yv = torch.from_numpy(np.ascontiguousarray(Y_val)).double()

    W = torch.zeros(n, t, dtype=dtype)
    best_W = torch.zeros(n, t, dtype=dtype)
    best_mse = torch.full((t,), float("inf"), dtype=torch.float64)
    best_lam = path[0].clone()
    since_best = torch.zeros(t, dtype=torch.long)
    L_carry = torch.full((t,), 0.5 * st.L, dtype=torch.float64)
    act = torch.arange(t)  # targets still walking down the path
    W_prev = torch.zeros(n, t, dtype=dtype)
    for k in range(path.shape[0]):
        full = act.numel() == t  # plain views instead of column gathers
        sel = slice(None) if full else act

        def cols(A, full=full, act=act):
            return A if full else A.index_select(1, act)

        lam_k = path[k, sel]
        if k == 0:
            Wa = W  # λ_max: β = 0 exactly
        else:
            # warm start: on a fixed support β(λ) is affine in λ, so extrapolate
            # along the secant of the last two path points (q = λ_k/λ_{k-1})
            Wc = cols(W)
            init = Wc
            if k >= 2:
                q = (lam_k / path[k - 1, sel].clamp_min(1e-300)).to(dtype)
                init = torch.addcmul(Wc, q, Wc - cols(W_prev))
            Wa, _, _, La = _fista(
                st.G, cols(st.C), st.yy[sel], lam_k, init,
                tol=tol, max_iter=max_iter, L_max=st.L, L_init=L_carry[sel],
            )
            if full:
                W_prev, W = Wc, Wa
            else:
                W_prev.index_copy_(1, act, Wc)
                W.index_copy_(1, act, Wa)
            L_carry[sel] = La
        pred = (Xv @ Wa).double() + (st.ybar[sel] - st.xbar @ Wa.double())
        mse = ((cols(Yv) - pred) ** 2).mean(0)
        better = mse < best_mse[sel]
        if bool(better.any()):
            bi = act[better]
            best_mse[bi] = mse[better]
            best_lam[bi] = lam_k[better]
            best_W.index_copy_(1, bi, Wa.index_select(1, better.nonzero().squeeze(1)))
        since_best[sel] = torch.where(better, torch.zeros_like(mse, dtype=torch.long), since_best[sel] + 1)
        if patience is not None:
            act = act[since_best[act] < patience]
            if act.numel() == 0:
                break

    sa = _stats_merge(st, Xv, Y_val, dtype)
    Wf, _, _, _ = _fista(
        sa.G, sa.C, sa.yy, best_lam, best_W, tol=tol, max_iter=max_iter, L_max=sa.L, L_init=L_carry
    )
    bf = _bias(sa, Wf)
    return LassoFit(
        weight=Wf.float().numpy(),
        bias=bf.float().numpy(),
        lam=best_lam.float().numpy(),
        val_mse=best_mse.float().numpy(),
    )
