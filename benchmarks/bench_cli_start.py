"""What a `dmm` process pays before its work: the command line's imports and loading digits, as shipped vs before.

Every `dmm` command imports the whole command line before it runs (cluster/cli.py). Ray, Dask and
scipy.stats are imported only inside the commands that use them; the "before" side imports them ahead of the
command line, as the command modules did at import until they were deferred (what a `dmm unlearn`, `dmm ledger`,
`dmm methods` or any refused command paid for nothing). Digits is read from scikit-learn's bundled table with the
split it ships (attribution/datasets.py); the "before" side imports scikit-learn and splits with it, as the loader
did. Each side runs as a fresh Python process from this one, interleaved, `--repeats` times; the median wall times
and their ratio are reported per case.

Run: python benchmarks/bench_cli_start.py [--repeats 5]
Prints a line per case, then one JSON line last (ratio = before / as shipped).
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

DMM = "import sys; from cluster.cli import main; sys.exit(main(sys.argv[1:]))"
DIGITS_BEFORE = ("from attribution.datasets import make_dataset\n"
                 "from sklearn.datasets import load_digits\n"
                 "from sklearn.model_selection import train_test_split\n"
                 "x, y = load_digits(return_X_y=True)\n"
                 "x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.2, stratify=y, random_state=0)\n"
                 "make_dataset('digits', x_tr, y_tr, x_te, y_te, num_classes=10)")
CASES = {  # name: (argv, code as shipped, code before)
    "dmm --help": (["--help"], DMM, f"import {', '.join(DEFERRED_IMPORTS)}; {DMM}"),
    "dmm methods": (["methods"], DMM, f"import {', '.join(DEFERRED_IMPORTS)}; {DMM}"),
    "load digits": ([], "from attribution.datasets import load_digits_dataset; load_digits_dataset()", DIGITS_BEFORE),
}


def wall(code: str, argv: list[str]) -> float:
    """Wall seconds of `python -c CODE ARGV` in a fresh process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each side per case; medians reported")
    args = parser.parse_args()
    per_case = {}
    for name, (argv, shipped_code, before_code) in CASES.items():
        times = {"shipped": [], "before": []}
        for _ in range(args.repeats):  # interleaved, so that a shared machine's drift hits both sides alike
            times["shipped"].append(wall(shipped_code, argv))
            times["before"].append(wall(before_code, argv))
        shipped, before = median(times["shipped"]), median(times["before"])
        per_case[name] = {"shipped_s": round(shipped, 3), "before_s": round(before, 3), "ratio": round(before / shipped, 3)}
        print(f"{name}: {shipped:.2f} s as shipped, {before:.2f} s before ({before / shipped:.2f}x)", flush=True)
    print(json.dumps({"bench": "cli_start", "min_ratio": min(r["ratio"] for r in per_case.values()),
                      "per_case": per_case}))


if __name__ == "__main__":
    main()
