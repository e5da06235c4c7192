"""Memory of one fit task, by formula (bytes; s = 4, the float32 compute dtype), and the bound on it.

A task fits t = T·k regressions of one target chunk on m_train + m_val fitting models (n training points):

    shared = 2·n²·s                      the design: G of the train rows and of train + val (`lasso_stats`;
                                         with fewer rows than n/2 their factor instead, rows·n·s each)
           + m·n                         the bool masks (m = m_train + m_val; the H held-out rows add H·n)
    chunk  = max(16·m·t, (16·s + 16)·n·t) + m_val·n·s + ROW_BLOCK·n·8 + 4·m·t
             (about 16 (n, t) matrices in s and two in float64 — β, the FISTA iterates and gradients, the
             correlations C — or the targets in float64 while C is summed; X_val; one row block of X in
             float64; the chunk's float32 logits)
    task   = shared + chunk

The shared part is built once per store snapshot and, on one node, held once: threads share it, Ray
workers map one copy from the object store (a GPU task copies the design to its device).  At CIFAR-10
scale (n = 50,000, m = 50,000 models of which 100 held out and 4,990 validate λ, T = 256, k = 10):
shared = 20.0 + 2.5 GB, chunk = 10.2 + 1.0 + 0.4 + 0.5 = 12.2 GB, task = 34.7 GB.  The 10 GB Gram is
held twice because the λ path needs the train rows' G and the refit the G of all fitting rows.  (When
every task built its own design it held, by the same count, ≈ 100 GB at its peak: X in float32, XᵀX and
G of the train rows, XᵀX of all rows and three n × n float64 temporaries of its centring.)  The
chunk term bounds the live bytes of `fit_datamodels` measured on three small shapes (VmHWM with
MALLOC_MMAP_THRESHOLD_=65536: 4–12 % under it); with glibc's defaults freed buffers stay mapped and
peak RSS reached 1.9× the measured live bytes.
"""

from __future__ import annotations

from .errors import DmmError
from .lasso_stats import ROW_BLOCK, factored

GB = 1e9


class FitMemoryError(DmmError):
    """A fit task that cannot fit in the memory the user allows; the message names the fix."""


def shared_bytes(n: int, m_train: int, m_val: int, s: int = 4) -> int:
    """The design (two n × n Grams, or their factors) and the bool masks of the m_train + m_val fitting models."""
    m = m_train + m_val
    return sum((rows if factored(rows, n) else n) * n * s for rows in (m_train, m)) + m * n


def chunk_bytes(n: int, t: int, m_train: int, m_val: int, s: int = 4) -> int:
    """One target chunk of t regressions on top of the shared part (see the module docstring)."""
    m = m_train + m_val
    return max(16 * m * t, (16 * s + 16) * n * t) + m_val * n * s + ROW_BLOCK * n * 8 + 4 * m * t


def task_bytes(n: int, t: int, m_train: int, m_val: int, s: int = 4) -> int:
    return shared_bytes(n, m_train, m_val, s) + chunk_bytes(n, t, m_train, m_val, s)


def check_task_memory(limit_gb: float | None, *, n: int, points: int, k: int, m_train: int, m_val: int) -> int:
    """Bytes one task of `points` targets (k classes each) needs; a FitMemoryError (one line) if over `limit_gb`.

    The message gives the largest --targets-per-chunk that fits, or says that the shared design alone does not.
    """
    if limit_gb is not None and not limit_gb > 0:
        raise FitMemoryError(f"--max-task-memory {limit_gb:g} GB; fix: pass a positive size in GB, e.g. 40")
    need = task_bytes(n, points * k, m_train, m_val)
    if limit_gb is None or need <= limit_gb * GB:
        return need
    fits = next((p for p in range(points - 1, 0, -1) if task_bytes(n, p * k, m_train, m_val) <= limit_gb * GB), None)
    if fits:
        fix = f"pass --targets-per-chunk {fits} or less, or raise --max-task-memory"
    else:
        fix = (f"the shared design and masks alone need {_gb(shared_bytes(n, m_train, m_val))} (n = {n} "
               f"points, {m_train + m_val} fitting models); run the fit where more memory is free and raise "
               "--max-task-memory")
    raise FitMemoryError(f"a fit task of {points} targets needs {_gb(need)}, over --max-task-memory "
                         f"{limit_gb:g} GB; fix: {fix}")


def _gb(nbytes: int) -> str:
    return f"{nbytes / GB:.3g} GB"
