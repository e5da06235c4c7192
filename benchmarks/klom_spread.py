"""KLoM rewards spread: a report's saved margins with Gaussian noise added, scored in both KLoM directions.

Reads `margins/<set>/` of a `dmm evaluate` report (oracle.npy, floor.npy, <method>.npy, groups.json) and, for
the floor (`retrain`, a second oracle sample) and one method, prints KLoM95 forget / retain / held-out in both
directions and the spread (`matching.klom.spread_ratio`, F / R) as saved and with N(0, sd²) added to every
margin (seed 0). In the reference direction KL(oracle ‖ unlearned) the noisy populations score lower — the
floor's below itself — in the other they score higher (README, "KLoM rewards spread").

Then what bounds the method's KLoM, its per-point mean or its spread: the method's margins with each point's
mean moved to the oracles' (m − mean(m) + mean(oracle), over models), with the spread the oracles have beyond
it added (+ z·sqrt(max(Var(oracle) − Var(m), 0)) per point, z ~ N(0, 1) seed 0), and both. Neither is an
unlearning method (both read the oracles); they say which part a better method would have to mend (README,
"DMM's spread on F").
Where the report has θ0's margins (`nothing`), also how much of the oracles' move the method makes: per group,
the slope Σ d·d̂ / Σ d² and the correlation of its per-point mean shift from θ0, d̂, on the oracles', d (slope 1
and correlation 1: the oracles' mean; docs/matching_sweeps.md, "Where DM-Direct's mean misses").
One JSON line last: {"bench": "klom_spread", "rows": {...}, "shift": {...}}.

Run: python benchmarks/klom_spread.py sweep_out/digits --set random:200:0 --method dmm --floor-noise 0.2 --noise 0.3
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.eval_report import GROUPS, read_groups, slug  # noqa: E402
from matching.klom import DIRECTIONS, klom, spread_ratio  # noqa: E402


def scores(oracle: np.ndarray, population: np.ndarray, groups: dict) -> dict:
    """KLoM95 per group in each direction and the spread on F and R."""
    row = {d: [float(np.percentile(klom(oracle[:, groups[g]], population[:, groups[g]], direction=d), 95))
               for g in GROUPS] for d in DIRECTIONS}
    row["spread"] = [spread_ratio(oracle[:, groups[g]], population[:, groups[g]]) for g in ("forget", "retain")]
    return row


def shift_fit(oracle: np.ndarray, population: np.ndarray, original: np.ndarray, groups: dict) -> dict:
    """Per group, the slope and correlation of the population's per-point mean shift from θ0 on the oracles'."""
    wanted, made = oracle.mean(axis=0) - original.mean(axis=0), population.mean(axis=0) - original.mean(axis=0)
    fit = {"slope": [], "correlation": []}
    for g in GROUPS:
        d, d_hat = wanted[groups[g]], made[groups[g]]
        fit["slope"].append(float(d @ d_hat / (d @ d)))
        fit["correlation"].append(float(np.corrcoef(d, d_hat)[0, 1]))
    return fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("report", type=Path, help="the --out folder of a `dmm evaluate` run")
    parser.add_argument("--set", required=True, help="forget set, as in the spec (random:200:0)")
    parser.add_argument("--method", default="dmm", help="a method of that run (default dmm)")
    parser.add_argument("--noise", type=float, default=0.3, help="sd of the noise added to the method's margins")
    parser.add_argument("--floor-noise", type=float, default=0.2, help="sd of the noise added to the floor's")
    args = parser.parse_args()
    folder = args.report / "margins" / slug(args.set)
    if not (folder / "oracle.npy").exists():
        raise SystemExit(f"error: no saved margins in {folder}; pass a report folder and a forget set it ran")
    groups = read_groups(folder)
    oracle = np.load(folder / "oracle.npy")
    rng = np.random.default_rng(0)
    rows = {}
    for name, file, sd in (("retrain", "floor", args.floor_noise), (args.method, args.method, args.noise)):
        margins = np.load(folder / f"{file}.npy")
        rows[name] = scores(oracle, margins, groups)
        rows[f"{name} + N(0, {sd}²)"] = scores(oracle, margins + rng.normal(0, sd, margins.shape), groups)
    centred = margins - margins.mean(axis=0) + oracle.mean(axis=0)
    missing = rng.standard_normal(margins.shape) * np.sqrt(np.maximum(oracle.var(axis=0) - margins.var(axis=0), 0))
    rows[f"{args.method}, mean → oracles'"] = scores(oracle, centred, groups)
    rows[f"{args.method} + oracles' missing spread"] = scores(oracle, margins + missing, groups)
    rows[f"{args.method}, both"] = scores(oracle, centred + missing, groups)
    print("| population | KL(oracle ‖ unlearned) F / R / H | KL(unlearned ‖ oracle) F / R / H | spread F / R |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        cells = [" / ".join(f"{v:.2f}" for v in row[k]) for k in (*DIRECTIONS, "spread")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    shift = None
    if (folder / "nothing.npy").exists():
        shift = shift_fit(oracle, margins, np.load(folder / "nothing.npy"), groups)
        print(f"{args.method}'s mean shift from θ0 on the oracles': slope F / R / H "
              + " / ".join(f"{v:.2f}" for v in shift["slope"]) + ", correlation "
              + " / ".join(f"{v:.2f}" for v in shift["correlation"]))
    print(json.dumps({"bench": "klom_spread", "set": args.set, "rows": rows, "shift": shift}))


if __name__ == "__main__":
    main()
