"""`dmm`'s start: importing the command line loads none of the packages only some commands need."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cluster.cli import DEFERRED_IMPORTS

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_command_line_defers_ray_dask_and_scipy_stats():
    code = ("import sys, cluster.cli; "
            f"print(' '.join(m for m in {DEFERRED_IMPORTS!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "", f"imported at `dmm`'s start: {loaded.stdout.strip()}"
    assert set(DEFERRED_IMPORTS) == {"ray", "dask", "dask.array", "scipy.stats"}
