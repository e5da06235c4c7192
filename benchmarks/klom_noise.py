"""How much of a KLoM95 is the draw of the oracles: a report's scores over resampled oracle sets.

A `dmm evaluate` report scores every population against one sample of N oracles (oracle.npy), and `retrain`,
a second sample of N (floor.npy), against the same N: the floor. Both samples are retrained models of the same
deletion, so which N of the 2N play the oracles is chance. This pools them, and --splits times (seed --seed)
draws N of the 2N as the oracles and keeps the other N as the floor; per split it scores the floor half and
every method against the oracle half (KLoM95 per group, `matching.klom`; KL(oracle ‖ unlearned), the reference
direction, or with --direction the reverse: the floor is then scored the same way), and the ratios
issue 13 point 2 sets targets on: a method's KLoM95 over the floor half's, and over --versus's (default
dm-direct), taken split by split (each against the same oracle half, so the oracle draw moves both sides). It
prints, per forget set and method, the KLoM95 the report gives, then the median and the 10th–90th percentiles
over the splits of KLoM95 and of both ratios. A gap between two methods that a split moves across is the
oracle draw's, not the methods'. With --models n (below the report's N) each split also draws n of every
population's models, the same originals for every method, and n oracles and n others as the floor: what a report
of n models reads over the draw of its originals, its requests' seeds and its oracles.

Reads `margins/<set>/` (oracle.npy, floor.npy, <method>.npy, groups.json) of every set the report has, or of
--set only; the methods are every saved population (--methods to choose). One JSON line last:
{"bench": "klom_noise", "splits": ..., "direction": ..., "sets": {set: {method: {"report": [F, R, H], "klom95":
{"median": …, "p10": …, "p90": …}, "vs_floor": {…}, "vs_<versus>": {…}}}}}.

Run: python benchmarks/klom_noise.py sweep_out/spread_sets_digits [--set class:3:10] [--methods dmm dm-direct]
[--direction unlearned||oracle] [--models 50]
(after `dmm evaluate --config configs/sweep_spread_sets_digits.yaml --out sweep_out/spread_sets_digits`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.eval_report import GROUPS, read_groups, slug  # noqa: E402
from matching.klom import DIRECTIONS, klom, klom_summary  # noqa: E402

SAMPLES = ("oracle", "floor")  # the report's two samples of retrained models
QUANTILES = {"median": 50, "p10": 10, "p90": 90}


def klom95(oracle: np.ndarray, population: np.ndarray, groups: dict, direction: str = DIRECTIONS[0]) -> np.ndarray:
    """KLoM95 per group (F, R, H) of a population against an oracle sample, in `direction`."""
    summary = klom_summary(klom(oracle, population, direction=direction), groups)
    return np.array([summary[g]["p95"] for g in GROUPS])


def split_scores(oracle: np.ndarray, floor: np.ndarray, populations: dict, groups: dict, splits: int,
                 seed: int, direction: str = DIRECTIONS[0], models: int | None = None) -> dict:
    """Per split s (its own N of the pooled 2N as oracles, the rest as the floor): {"floor": (splits, 3),
    method: (splits, 3)} KLoM95 per group against split s's oracles. With `models` = n < N, each split draws n of
    the 2N as oracles and n others as the floor, and n of every population's N models — the same rows for every
    method, whose models are the same originals unlearned — so it reads what a report of n models would."""
    pool, n = np.concatenate([oracle, floor]), len(oracle)
    size = models or n
    rng = np.random.default_rng(seed)
    scores = {name: np.empty((splits, len(GROUPS))) for name in ("floor", *populations)}
    for s in range(splits):
        order = rng.permutation(len(pool))
        reference = pool[order[:size]]
        scores["floor"][s] = klom95(reference, pool[order[size:2 * size]], groups, direction)
        rows = np.sort(rng.choice(n, size, replace=False)) if models else slice(None)
        for name, margins in populations.items():
            scores[name][s] = klom95(reference, margins[rows], groups, direction)
    return scores


def quantiles(values: np.ndarray) -> dict:
    return {q: np.percentile(values, p, axis=0).tolist() for q, p in QUANTILES.items()}


def set_readout(folder: Path, methods: list[str] | None, versus: str, splits: int, seed: int,
                direction: str = DIRECTIONS[0], models: int | None = None) -> dict:
    groups = read_groups(folder)
    oracle, floor = (np.load(folder / f"{name}.npy") for name in SAMPLES)
    names = methods or sorted(p.stem for p in folder.glob("*.npy") if p.stem not in SAMPLES)
    missing = [m for m in names + [versus] if not (folder / f"{m}.npy").exists()]
    if missing:
        raise SystemExit(f"error: {folder} has no saved margins of {', '.join(missing)}; choose --methods and "
                         f"--versus among {', '.join(sorted(p.stem for p in folder.glob('*.npy')))}")
    populations = {m: np.load(folder / f"{m}.npy") for m in dict.fromkeys(names + [versus])}
    sizes = {len(p) for p in populations.values()} | {len(oracle), len(floor)}
    if models is not None and not 1 <= models < min(sizes):
        raise SystemExit(f"error: --models {models} must be below the report's {min(sizes)} models per population; "
                         f"e.g. --models {min(sizes) // 2}")
    scores = split_scores(oracle, floor, populations, groups, splits, seed, direction, models)
    readout = {"retrain": {"report": klom95(oracle, floor, groups, direction).tolist(),
                           "klom95": quantiles(scores["floor"])}}
    for name in names:
        readout[name] = {"report": klom95(oracle, populations[name], groups, direction).tolist(),
                         "klom95": quantiles(scores[name]),
                         "vs_floor": quantiles(scores[name] / scores["floor"]),
                         f"vs_{versus}": quantiles(scores[name] / scores[versus])}
    return readout


def cell(q: dict, digits: int = 2) -> str:
    return " / ".join(f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
                      for m, lo, hi in zip(q["median"], q["p10"], q["p90"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="the --out folder of a `dmm evaluate` run with `retrain` in it")
    parser.add_argument("--set", help="one forget set, as in the spec (random:200:0); default every saved one")
    parser.add_argument("--methods", nargs="+", help="populations to score (default: every one saved)")
    parser.add_argument("--versus", default="dm-direct", help="the method each one's ratio is taken to")
    parser.add_argument("--splits", type=int, default=50, help="oracle draws (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--direction", choices=DIRECTIONS, default=DIRECTIONS[0],
                        help="KL(oracle ‖ unlearned), the reference (default), or the reverse")
    parser.add_argument("--models", type=int, help="read it as a report of this many models: each draw also picks "
                        "that many of every population's (the same originals for all) and of the oracles")
    args = parser.parse_args()
    if args.splits < 1:
        raise SystemExit(f"error: --splits {args.splits} must be at least 1; e.g. --splits 50")
    root = args.report / "margins"
    folders = [root / slug(args.set)] if args.set else sorted(root.glob("*/"))
    for folder in folders:
        if not all((folder / f"{name}.npy").exists() for name in SAMPLES):
            raise SystemExit(f"error: {folder} lacks oracle.npy or floor.npy; pass the --out folder of a report whose "
                             "spec ran `retrain` on that forget set")
    result = {}
    for folder in folders:
        result[folder.name] = readout = set_readout(folder, args.methods, args.versus, args.splits, args.seed,
                                                    args.direction, args.models)
        drawn = f" of {args.models} oracles and {args.models} models per population" if args.models else ""
        print(f"\n{folder.name}: KLoM95 F / R / H, median [p10, p90] over {args.splits} oracle draws{drawn}, "
              f"KL({args.direction.replace('||', ' ‖ ')})")
        print(f"| method | report | KLoM95 | over the floor | over {args.versus} |")
        print("|---|---|---|---|---|")
        for name, row in readout.items():
            report = " / ".join(f"{v:.2f}" for v in row["report"])
            ratios = [cell(row[k]) if k in row else "—" for k in ("vs_floor", f"vs_{args.versus}")]
            print(f"| {name} | {report} | {cell(row['klom95'])} | " + " | ".join(ratios) + " |")
    print(json.dumps({"bench": "klom_noise", "splits": args.splits, "versus": args.versus,
                      "direction": args.direction, "models": args.models, "sets": result}))


if __name__ == "__main__":
    main()
