"""`dmm`'s start: each command as shipped vs the same command with `cluster.cli.DEFERRED_IMPORTS` imported first.

Every `dmm` command imports the whole command line before it runs (cluster/cli.py). Ray, Dask and
scipy.stats are imported only inside the commands that use them; the other side imports them before the
command line, as the command modules did at import before (what a `dmm unlearn`, `dmm ledger`, `dmm methods`
or any refused command paid for nothing). Both sides run as fresh Python processes from this one, interleaved,
`--repeats` times each; the median wall times and their ratio are reported, for `dmm --help` and `dmm methods`.

Run: python benchmarks/bench_cli_start.py [--repeats 5]
Prints a line per command, then one JSON line last (ratio = eager / as shipped).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cluster.cli import DEFERRED_IMPORTS  # noqa: E402

COMMANDS = (["--help"], ["methods"])


def run_dmm(argv: list[str], eager: bool) -> float:
    """Wall seconds of `dmm ARGV` in a fresh process (with the deferred packages imported first if `eager`)."""
    first = f"import {', '.join(DEFERRED_IMPORTS)}; " if eager else ""
    code = f"{first}import sys; from cluster.cli import main; sys.exit(main(sys.argv[1:]))"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side per command; medians reported")
    args = parser.parse_args()
    per_command = {}
    for argv in COMMANDS:
        times = {"shipped": [], "eager": []}
        for _ in range(args.repeats):  # interleaved, so that a shared machine's drift hits both sides alike
            times["shipped"].append(run_dmm(argv, eager=False))
            times["eager"].append(run_dmm(argv, eager=True))
        shipped, eager = median(times["shipped"]), median(times["eager"])
        name = "dmm " + " ".join(argv)
        per_command[name] = {"shipped_s": round(shipped, 3), "eager_s": round(eager, 3), "ratio": round(eager / shipped, 3)}
        print(f"{name}: {shipped:.2f} s as shipped, {eager:.2f} s with {', '.join(DEFERRED_IMPORTS)} imported at "
              f"start ({eager / shipped:.2f}x)", flush=True)
    print(json.dumps({"bench": "cli_start", "min_ratio": min(r["ratio"] for r in per_command.values()),
                      "per_command": per_command}))


if __name__ == "__main__":
    main()
