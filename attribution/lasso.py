"""Batched L1-regularised datamodel solver (DESIGN.md §1, step 1): the λ path, its selection and the refit.

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
* All targets share X, so everything runs on sufficient statistics
  (``lasso_stats``): the *design* G = X_cᵀX_c/m (n × n; its m × n factor when
  2m < n), x̄ and ‖G‖₂, built once per store snapshot and passed to every chunk
  (``design=``; built here when absent), and per chunk C = X_cᵀY_c/m (n × t,
  float64) and ‖y_c‖²/m.  One iteration for all targets is then a single G @ W
  GEMM, or two through the factor (``fista``).
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
  its statistics are assembled from the train ones (no second pass over X).

Everything runs in ``dtype`` (float32 by default) on ``device`` (the CPU, or a
CUDA GPU: the same code); per-target scalars of the objective/gap are combined
in float64.  Returned arrays are float32 numpy.  Memory of one call: the design
(``fit_memory.shared_bytes``) plus ``fit_memory.chunk_bytes``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .fista import fista
from .lasso_inputs import check_lam, check_opts, check_path, check_xy
from .lasso_stats import Design, as_tensor, build_design, merged_targets, target_stats, xty

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


@dataclass
class LassoFit:
    """Fitted datamodels for one chunk of t targets.

    weight: (n, t) float32, β; applies to raw 0/1 masks.
    bias:   (t,) float32, β0; prediction for a mask x is x @ weight + bias.
    lam:    (t,) float32, chosen λ per target.
    val_mse:(t,) float32, validation MSE at the chosen λ (train-only fit).
    at_max_iter: (t,) bool, the refit stopped at max_iter before its duality gap reached tol.
    """

    weight: np.ndarray
    bias: np.ndarray
    lam: np.ndarray
    val_mse: np.ndarray
    at_max_iter: np.ndarray


def _numpy(a: torch.Tensor) -> np.ndarray:
    return a.float().cpu().numpy()


def warn_at_max_iter(count: int, max_iter: int, tol: float) -> None:
    """The one warning of a solve whose `count` targets stopped at max_iter (none when 0)."""
    if count:
        warnings.warn(f"lasso: {count} target(s) hit max_iter={max_iter} before the duality gap reached "
                      f"tol={tol:g}; raise max_iter or loosen tol", RuntimeWarning, stacklevel=3)


def lambda_path(X, Y, path_length: int = DEFAULT_PATH_LENGTH, min_ratio: float = DEFAULT_MIN_RATIO) -> np.ndarray:
    """Per-target decreasing λ grid, shape (path_length, t), float64.

    Row 0 is λ_max = ‖X_cᵀy_c‖∞/m (smallest λ with all-zero β); the grid is
    geometric down to λ_max·min_ratio.
    """
    check_path(path_length, min_ratio)
    X, Y = check_xy(X, Y)
    Yd = torch.from_numpy(np.ascontiguousarray(Y)).double()
    C = xty(X, Yd - Yd.mean(0)) / X.shape[0]
    return _path_from_C(C, int(path_length), float(min_ratio))


def _path_from_C(C: torch.Tensor, path_length: int, min_ratio: float) -> np.ndarray:
    lmax = C.abs().amax(0).double().cpu().numpy() if C.shape[0] else np.zeros(C.shape[1])
    if path_length == 1:
        ratios = np.ones(1)
    else:
        ratios = min_ratio ** (np.arange(path_length) / (path_length - 1))
    return ratios[:, None] * lmax[None, :]


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
    check_opts(tol, max_iter, dtype)
    X, Y = check_xy(X, Y)
    n, t = X.shape[1], Y.shape[1]
    lam = check_lam(lam, t)
    if init is not None:
        init = np.asarray(init.detach().cpu().numpy() if isinstance(init, torch.Tensor) else init)
        if init.shape != (n, t):
            raise ValueError(f"init has shape {init.shape}; expected (n, t) = {(n, t)}")
        if not np.isfinite(init).all():
            raise ValueError("init contains NaN or inf; pass a finite warm start or None")
    cpu = torch.device("cpu")
    mo = build_design(X, dtype=dtype, device=cpu).train
    G, xbar = mo.on(cpu)
    st = target_stats(X, Y, dtype, cpu)
    W, _, _, _, stopped = fista(
        G, st.C, st.yy, torch.from_numpy(lam),
        None if init is None else torch.from_numpy(np.ascontiguousarray(init)).to(dtype),
        tol=tol, max_iter=max_iter, L_max=mo.L,
    )
    warn_at_max_iter(int(stopped.sum()), max_iter, tol)
    return _numpy(W), _numpy(st.ybar - xbar @ W.double())


def lasso_objective(X, Y, weight, bias, lam) -> np.ndarray:
    """Per-target ½‖y − b − Xw‖²/m + λ‖w‖₁, computed in float64 from residuals."""
    X, Y = check_xy(X, Y)
    t = Y.shape[1]
    lam = check_lam(lam, t)
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
    design: Design | None = None,
    device: torch.device | str = "cpu",
    warn: bool = True,
) -> LassoFit:
    """Datamodels for one chunk: λ path on train, λ chosen on val, refit on all.

    X_*: (m_*, n) 0/1 masks of the subset models (train / held-out models);
    Y_*: (m_*, t) the t targets on those models (same columns in both).
    path_length/min_ratio: the per-target grid (see ``lambda_path``).
    tol/max_iter/dtype: as in ``solve_lasso`` (used for every λ and the refit).
    patience: a target stops walking the path after this many λ without a
    better validation MSE; None walks the whole grid.
    design: ``build_design(X_train, X_val, dtype=dtype)`` shared by every chunk of
    these masks (checked against them; built here when None: the same numbers).
    device: where the solver runs (``cpu`` or ``cuda[:N]``).
    warn: one RuntimeWarning when refits stop at max_iter (``dmm fit`` counts them over chunks instead).
    Returns a ``LassoFit`` (β = weight, β0 = bias, chosen λ, its val MSE, the refits at max_iter).
    """
    check_opts(tol, max_iter, dtype)
    X_train, Y_train = check_xy(X_train, Y_train, "X_train", "Y_train")
    n, t = X_train.shape[1], Y_train.shape[1]
    X_val, Y_val = check_xy(X_val, Y_val, "X_val", "Y_val", n=n)
    if Y_val.shape[1] != t:
        raise ValueError(
            f"Y_val has {Y_val.shape[1]} targets but Y_train has {t}; pass the same target columns"
        )
    check_path(path_length, min_ratio, patience)
    device = torch.device(device)
    if design is None:
        design = build_design(X_train, X_val, dtype=dtype, device=device)
    else:
        design.check(X_train, X_val, dtype)

    G, xbar = design.train.on(device)
    st = target_stats(X_train, Y_train, dtype, device)
    path = torch.from_numpy(_path_from_C(st.C64, int(path_length), float(min_ratio))).to(device)
    Xv = as_tensor(X_val, dtype, device)
    Yv = torch.from_numpy(np.ascontiguousarray(Y_val)).to(device, torch.float64)

    W = torch.zeros(n, t, dtype=dtype, device=device)
    best_W = torch.zeros(n, t, dtype=dtype, device=device)
    best_mse = torch.full((t,), float("inf"), dtype=torch.float64, device=device)
    best_lam = path[0].clone()
    since_best = torch.zeros(t, dtype=torch.long, device=device)
    L_carry = torch.full((t,), 0.5 * design.train.L, dtype=torch.float64, device=device)
    act = torch.arange(t, device=device)  # targets still walking down the path
    W_prev = torch.zeros(n, t, dtype=dtype, device=device)
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
            Wa, _, _, La, _ = fista(  # a path point stopped at max_iter only ranks λ: the refit counts
                G, cols(st.C), st.yy[sel], lam_k, init,
                tol=tol, max_iter=max_iter, L_max=design.train.L, L_init=L_carry[sel],
            )
            if full:
                W_prev, W = Wc, Wa
            else:
                W_prev.index_copy_(1, act, Wc)
                W.index_copy_(1, act, Wa)
            L_carry[sel] = La
        pred = (Xv @ Wa).double() + (st.ybar[sel] - xbar @ Wa.double())
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

    del W, W_prev, Wa, G
    sa = merged_targets(st, design.train.colsum, X_val, Y_val, dtype)
    G_all, xbar_all = design.full.on(device)
    Wf, _, _, _, stopped = fista(
        G_all, sa.C, sa.yy, best_lam, best_W, tol=tol, max_iter=max_iter, L_max=design.full.L, L_init=L_carry
    )
    if warn:
        warn_at_max_iter(int(stopped.sum()), max_iter, tol)
    return LassoFit(
        weight=_numpy(Wf),
        bias=_numpy(sa.ybar - xbar_all @ Wf.double()),
        lam=_numpy(best_lam),
        val_mse=_numpy(best_mse),
        at_max_iter=stopped.cpu().numpy(),
    )
