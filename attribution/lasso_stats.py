"""Sufficient statistics of the datamodel regressions (`lasso`, eq. (1)): the shared design's and the targets'.

Every target of a store is regressed on the same 0/1 masks X (m × n), so what depends on X alone — the
*design* — is computed once per store snapshot (:func:`build_design`) and reused by every target chunk:

    colsum = Σ_i x_i,   x̄ = colsum / m,   G = X_cᵀX_c / m = XᵀX / m − x̄x̄ᵀ,   L ≈ largest eigenvalue of G,

for the train rows (the λ path) and for train + validation rows (the refit at the chosen λ).  With fewer
models than half the points (2m < n: small stores, quick runs) G is kept as its factor F = X_c/√m (m × n,
G = FᵀF) instead: the solver's product G·W is then Fᵀ(F·W), 2·m·n·t flops instead of n²·t, and the design
holds m·n numbers instead of n² (:class:`Gram`).  λ_max of a target, ‖X_cᵀy_c‖∞ / m, needs y: its only
design input is x̄, which drops out (Σ_i y_c,i = 0).
A target chunk adds its own statistics (:func:`target_stats`): ȳ, C = X_cᵀY_c / m and ‖y_c‖² / m.

XᵀX of 0/1 masks is summed in the compute dtype over row blocks: its entries are counts ≤ m, exact in
float32 below 2²⁴ in any order, so the blocked sum is bitwise the single GEMM.  X_cᵀY_c is summed in
float64 over the same row blocks (one GEMM while m ≤ ROW_BLOCK), so no task holds X in float64.
Memory of a design: 2 n² s bytes (s = 4 in float32; m·n·s for a factored one) — 20 GB at CIFAR-10's
n = 50,000 — plus, while it is built, one row block and one column block.  Its arrays are numpy on the CPU:
Ray's object store holds one copy a node shares with every task (zero-copy), and each task moves them to
its own device.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

ROW_BLOCK = 1024  # models per block of X moved to the device and widened (b·n·8 bytes)
COL_BLOCK = 1024  # columns of XᵀX centred at a time (n·b·8 bytes of float64 temporaries)
_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def as_tensor(X: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Masks (any numeric or bool dtype) as a new `dtype` tensor on `device`."""
    return torch.from_numpy(X.astype(_NP_DTYPE[dtype])).to(device)


def row_blocks(X: np.ndarray, dtype: torch.dtype, device: torch.device):
    """(row slice, X[rows] as a `dtype` tensor on `device`) for consecutive blocks of ROW_BLOCK models."""
    for start in range(0, X.shape[0], ROW_BLOCK):
        rows = slice(start, min(start + ROW_BLOCK, X.shape[0]))
        yield rows, as_tensor(X[rows], dtype, device)


def colsum(X: np.ndarray) -> np.ndarray:
    """Σ_i x_i in float64 (exact for 0/1 masks)."""
    return X.sum(0, dtype=np.float64)


def xty(X: np.ndarray, Yc: torch.Tensor) -> torch.Tensor:
    """XᵀY_c in float64 (n, t), summed over row blocks of X; Y_c (m, t) float64 on the device."""
    out = None
    for rows, Xb in row_blocks(X, torch.float64, Yc.device):
        part = Xb.T @ Yc[rows]
        out = part if out is None else out.add_(part)
    return out


def gram_pass(xtx: torch.Tensor, X: np.ndarray) -> None:
    """xtx += XᵀX over row blocks of X (in xtx's dtype, on its device): the only pass over the masks' n² products."""
    for _, Xb in row_blocks(X, xtx.dtype, xtx.device):
        xtx.addmm_(Xb.T, Xb)


def _on(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """`a` as a tensor on `device`, zero-copy on the CPU."""
    if a.flags.writeable:
        return torch.from_numpy(a).to(device)
    with warnings.catch_warnings():  # Ray's zero-copy arrays are read-only; nothing here writes to them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a).to(device)


def top_eig(G: Gram, iters: int = 40) -> float:
    """Largest eigenvalue of the PSD matrix G by block power iteration (5 % above; seeded start on the CPU)."""
    n = G.n
    if n == 0:
        return 0.0
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(n, min(4, n), generator=gen, dtype=G.dtype).to(G.device)
    for _ in range(iters):
        V, _ = torch.linalg.qr(G @ V)
    H = V.T @ (G @ V)
    lam = float(torch.linalg.eigvalsh(H.double())[-1])
    return max(lam, 0.0) * 1.05 + 1e-12


def factored(m: int, n: int) -> bool:
    """Whether the design of m models over n points keeps F = X_c/√m (m × n) rather than G (n × n): when 2m < n,
    where Fᵀ(F·W) costs fewer flops than G·W."""
    return 2 * m < n


class Gram:
    """G = X_cᵀX_c/m as the solver uses it, on one device: from the n × n matrix, or from F = X_c/√m (G = FᵀF)."""

    def __init__(self, matrix: torch.Tensor, is_factor: bool):
        self.matrix, self.is_factor = matrix, is_factor
        self.n = matrix.shape[1]
        self.dtype, self.device = matrix.dtype, matrix.device

    def _operands(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with G·W = A @ B: (G, W), or (Fᵀ, F·W) where factored (the first of its two GEMMs done)."""
        return (self.matrix.T, self.matrix @ W) if self.is_factor else (self.matrix, W)

    def __matmul__(self, W: torch.Tensor) -> torch.Tensor:
        A, B = self._operands(W)
        return A @ B

    def grad(self, W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """G·W − C (the gradient of ½wᵀGw − cᵀw, every column) in one GEMM, two where factored."""
        A, B = self._operands(W)
        return torch.addmm(C, A, B, beta=-1)


@dataclass(frozen=True)
class Moments:
    """The design of m models: Σ_i x_i (float64), G = X_cᵀX_c/m (compute dtype) and L ≥ ‖G‖₂. G is held as the
    n × n matrix `G`, or where `factored(m, n)` as its factor `F` = X_c/√m (m × n), `G` then None."""

    m: int
    colsum: np.ndarray
    G: np.ndarray | None
    L: float
    F: np.ndarray | None = None

    def on(self, device: torch.device) -> tuple[Gram, torch.Tensor]:
        """(G, x̄) on `device` (zero-copy on the CPU)."""
        gram = Gram(_on(self.G, device), False) if self.F is None else Gram(_on(self.F, device), True)
        return gram, _on(self.colsum / self.m, device)


def _centre(xtx: torch.Tensor, colsum: np.ndarray, m: int, out: torch.Tensor) -> Moments:
    """G = XᵀX/m − x̄x̄ᵀ in float64, rounded to out's dtype, one column block at a time (out may be xtx)."""
    xbar = torch.from_numpy(colsum / m).to(xtx.device)
    for j in range(0, xtx.shape[1], COL_BLOCK):
        cols = slice(j, j + COL_BLOCK)
        out[:, cols] = (xtx[:, cols].double() / m - torch.outer(xbar, xbar[cols])).to(out.dtype)
    return Moments(m, colsum, out.cpu().numpy(), top_eig(Gram(out, False)))


def _factor(X: np.ndarray, dtype: torch.dtype, device: torch.device) -> Moments:
    """F = X_c/√m of the masks X (m × n), centred in float64 and rounded to `dtype`: the design where 2m < n."""
    m, cs = X.shape[0], colsum(X)
    F = ((as_tensor(X, torch.float64, device) - torch.from_numpy(cs / m).to(device)) / np.sqrt(m)).to(dtype)
    return Moments(m, cs, None, top_eig(Gram(F, True)), F.cpu().numpy())


@dataclass(frozen=True)
class Design:
    """The shared design of a fit: the train rows' moments and those of train + validation (None without)."""

    train: Moments
    full: Moments | None
    dtype: torch.dtype

    def check(self, X_train: np.ndarray, X_val: np.ndarray | None, dtype: torch.dtype) -> None:
        """Refuse (one line) a design of other masks (by shapes and column sums), without validation rows when
        X_val is given, or in another dtype."""
        tr, full = self.train, self.full
        if X_val is not None and full is None:
            raise ValueError("the shared design has no validation rows; build it with build_design(X_train, X_val)")
        n = tr.colsum.size
        same = X_train.shape == (tr.m, n) and np.array_equal(colsum(X_train), tr.colsum)
        if same and X_val is not None:
            same = X_val.shape == (full.m - tr.m, n) and np.array_equal(tr.colsum + colsum(X_val), full.colsum)
        if not same:
            raise ValueError(f"the shared design ({tr.m} train models × {n} points) was built from other masks; "
                             "rebuild it with build_design(X_train, X_val) of these masks")
        if dtype != self.dtype:
            raise ValueError(f"the shared design is in {self.dtype}, the fit in {dtype}; build it in the fit's dtype")


def build_design(X_train: np.ndarray, X_val: np.ndarray | None = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Design:
    """The design-only statistics of eq. (1), computed on `device`: one pass of XᵀX over the masks' rows, or
    the centred masks themselves where `factored` (each of the two moments decides by its own m)."""
    device = torch.device(device)
    m_train, n = X_train.shape
    m_full = m_train + (0 if X_val is None else X_val.shape[0])
    cs = colsum(X_train)
    # XᵀX for the moments that keep G: none when the full rows' is factored (m_full ≥ m_train, so both are)
    xtx = None if factored(m_full, n) else torch.zeros(n, n, dtype=dtype, device=device)
    if xtx is not None:
        gram_pass(xtx, X_train)
    train = _factor(X_train, dtype, device) if factored(m_train, n) else _centre(xtx, cs, m_train, torch.empty_like(xtx))
    full = None
    if X_val is not None and xtx is None:
        full = _factor(np.concatenate([X_train, X_val]), dtype, device)
    elif X_val is not None:
        gram_pass(xtx, X_val)
        full = _centre(xtx, cs + colsum(X_val), m_full, xtx)
    return Design(train, full, dtype)


@dataclass
class Targets:
    """A chunk's target statistics on m models: ȳ (t,), C = X_cᵀY_c/m (n, t) in float64 and the compute
    dtype, ‖y_c‖²/m (t,)."""

    m: int
    ybar: torch.Tensor
    C64: torch.Tensor
    C: torch.Tensor
    yy: torch.Tensor


def target_stats(X: np.ndarray, Y: np.ndarray, dtype: torch.dtype, device: torch.device) -> Targets:
    m = X.shape[0]
    Yd = torch.from_numpy(np.ascontiguousarray(Y)).to(device, torch.float64)
    ybar = Yd.mean(0)
    Yc = Yd - ybar
    del Yd
    yy = (Yc * Yc).sum(0) / m
    # float64 here so that λ ≥ λ_max = ‖C‖∞ gives exactly β = 0 after rounding (rounding is monotone);
    # Σ Y_c = 0, so the x̄ term vanishes
    C64 = xty(X, Yc) / m
    return Targets(m, ybar, C64, C64.to(dtype), yy)


def merged_targets(a: Targets, colsum_a: np.ndarray, Xv: np.ndarray, Yv: np.ndarray, dtype: torch.dtype) -> Targets:
    """Target statistics of the concatenation [train; val] from the train ones (no second pass over X_train)."""
    mv = Xv.shape[0]
    m = a.m + mv
    Yvd = torch.from_numpy(np.ascontiguousarray(Yv)).to(a.ybar.device, torch.float64)
    ybar = (a.ybar * a.m + Yvd.sum(0)) / m
    shift = a.ybar - ybar  # (t,)
    Yvc = Yvd - ybar
    # Xᵀ(Y − ȳ_all) over both parts; train part = m_a C_a + colsum_a ⊗ (ȳ_a − ȳ_all)
    cs = torch.from_numpy(colsum_a).to(a.ybar.device)
    C = (a.C64 * a.m + torch.outer(cs, shift) + xty(Xv, Yvc)) / m
    yy = (a.yy * a.m + a.m * shift**2 + (Yvc * Yvc).sum(0)) / m
    return Targets(m, ybar, C, C.to(dtype), yy)
