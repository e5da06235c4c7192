"""Is a deletion's effect the sum of its parts' effects, and how much of the difference does DM-Direct carry?

DM-Direct (and any datamodel, TRAK or influence estimate) predicts the effect of deleting F as a sum over F's
points. Retraining measures what a sum over *parts* of F misses: for a split F = F_1 ∪ … ∪ F_K, with ō_S the
oracles' mean margin after deleting S and θ̄ the originals', the non-additivity at a point x is

    e(x) = ō_F(x) − Σ_k ō_{F_k}(x) + (K − 1)·θ̄(x),

0 for every x when the effects add. Reads a `dmm evaluate` report whose spec has the full set (with `nothing`
and `dm-direct`) and, as `ids:FILE` sets, the parts of one or more splits (`configs/sweep_additivity_digits.yaml`),
and prints per split and group (F / R / H):
- the rms of e in oracle sd (per point, the oracles' sd over seeds), its sampling noise removed: e is computed
  once from the oracle samples and once from the floor samples (independent retrains), and their product's
  mean, less θ̄'s shared sampling variance, is e's systematic mean square; and e's mean (of the two);
- for two splits of the same K, the rms of the difference of their e (θ̄ and ō_F cancel): the part that depends on
  how F is split, i.e. interactions between F's points, not the deletion's size;
- DM-Direct's own per-point error, the same way, and its slope on e (the two from different oracle samples): −1
  where it carries none of the non-additivity, 0 where it carries all of it (datamodels fitted on α-subsets carry
  part of it: with pairwise interactions b_ij, β_i = a_i + α·Σ_j b_ij);
- a population built from the parts' measured effects — the originals' first --models models plus Σ_k(ō_{F_k} −
  θ̄'), θ̄' the other originals' mean — scored like any method over --splits oracle draws of --models each
  (`klom_noise.split_scores`), and with `--spread` also with the oracles' extra spread added on F (z·sqrt(Var
  oracle − Var θ0), as DMM's `--spread` adds s_x; read from the oracles, so a diagnosis, not a method).
A sum of exact per-point (leave-one-out) effects misses at least the interactions a split into parts keeps, and
the parts' population is what a sum of exact part effects reaches (docs/matching_sweeps.md, "Deleting 200 random
points is not additive").
One JSON line last: {"bench": "additivity", "set": ..., "splits": {...}, "dm_direct_error": [...], "vs_floor": {...}}.

Run: dmm evaluate --config configs/sweep_additivity_digits.yaml --out sweep_out/additivity_digits, then
python benchmarks/additivity.py sweep_out/additivity_digits --set random:200:0
    --split halves=configs/additivity_digits/h0.txt,configs/additivity_digits/h1.txt ... --spread
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.klom_noise import quantiles, split_scores  # noqa: E402
from cluster.eval_report import GROUPS, read_groups, slug  # noqa: E402


class Report:
    """One report's saved margins (float64), by forget set and population."""

    def __init__(self, folder: Path):
        self.root = folder / "margins"

    def margins(self, forget_set: str, name: str) -> np.ndarray:
        path = self.root / slug(forget_set) / f"{name}.npy"
        if not path.exists():
            raise SystemExit(f"error: {path} is missing; run `dmm evaluate` with {forget_set} in forget_sets and "
                             "`nothing`, `retrain` and `dm-direct` in methods")
        return np.load(path).astype(np.float64)

    def groups(self, forget_set: str) -> dict[str, np.ndarray]:
        groups = read_groups(self.root / slug(forget_set))
        return {g: groups[g] for g in GROUPS}


def crossed_square(a: np.ndarray, b: np.ndarray, shared_var, sd: np.ndarray) -> np.ndarray:
    """Per point, (a·b − shared_var) / sd²: for two estimates a, b of one quantity with independent noise but shared
    noise of variance shared_var, an unbiased estimate of the product of their systematic parts, in units of sd²."""
    return (a * b - shared_var) / sd ** 2


def parse_split(text: str) -> tuple[str, list[str]]:
    name, _, files = text.partition("=")
    if not files:
        raise SystemExit(f"error: --split {text!r} needs NAME=FILE,FILE[,...]; e.g. --split halves=h0.txt,h1.txt")
    return name, [f"ids:{f}" for f in files.split(",")]


def check_partition(report: Report, full: str, split: dict[str, list[str]]) -> None:
    forget = set(report.groups(full)["forget"].tolist())
    for name, parts in split.items():
        ids = [set(report.groups(p)["forget"].tolist()) for p in parts]
        if sum(map(len, ids)) != len(forget) or set().union(*ids) != forget:
            raise SystemExit(f"error: split {name!r} is not a partition of {full}'s forget set into disjoint parts; "
                             "give files whose ids together are exactly F, each id once")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="the --out folder of a `dmm evaluate` run")
    parser.add_argument("--set", required=True, help="the full forget set, as in the spec (random:200:0)")
    parser.add_argument("--split", action="append", required=True, type=parse_split,
                        help="NAME=FILE,FILE[,...]: the ids files of one split of F (repeat for more splits)")
    parser.add_argument("--models", type=int, default=50, help="models per scored population (default 50)")
    parser.add_argument("--splits", type=int, default=50, help="oracle draws (default 50)")
    parser.add_argument("--spread", action="store_true", help="also score each population with the oracles' spread on F")
    args = parser.parse_args()
    report, full = Report(args.report), args.set
    split = dict(args.split)
    check_partition(report, full, split)
    groups = report.groups(full)
    theta = report.margins(full, "nothing")
    n = args.models
    if not 1 <= n < len(theta):
        raise SystemExit(f"error: --models {n} must be between 1 and {len(theta) - 1} (the report has {len(theta)} "
                         "originals; the rest give the originals' mean)")
    theta_mean, theta_var = theta.mean(0), theta.var(0, ddof=1) / len(theta)
    sample = {s: report.margins(full, s) for s in ("oracle", "floor")}
    sd = np.sqrt(0.5 * (sample["oracle"].var(0, ddof=1) + sample["floor"].var(0, ddof=1)))
    means = {(p, s): report.margins(p, s).mean(0) for parts in split.values() for p in parts + [full]
             for s in ("oracle", "floor")}

    def rms(a, b, shared=0.0):
        """Per group, the rms of the systematic part: sqrt(mean of the crossed square), 0 where noise makes it < 0."""
        square = crossed_square(a, b, shared, sd)
        return [float(np.sqrt(max(square[groups[g]].mean(), 0.0))) for g in GROUPS]

    direct = report.margins(full, "dm-direct").mean(0)
    direct_error = {s: direct - means[full, s] for s in ("oracle", "floor")}
    result = {"set": full, "splits": {}}
    print(f"{full}: per-point rms in oracle sd, F / R / H (sampling noise removed)")
    for name, parts in split.items():
        k = len(parts)
        e = {s: means[full, s] - sum(means[p, s] for p in parts) + (k - 1) * theta_mean for s in ("oracle", "floor")}
        # DM-Direct's error regressed on e, the two from different oracle samples: −1 if it carries none of e, 0 all
        # (DM-Direct's population is the originals moved, so it shares θ̄'s sampling noise with e's (K − 1)·θ̄)
        crossed = 0.5 * (crossed_square(direct_error["oracle"], e["floor"], (k - 1) * theta_var, sd)
                         + crossed_square(direct_error["floor"], e["oracle"], (k - 1) * theta_var, sd))
        ms = crossed_square(e["oracle"], e["floor"], (k - 1) ** 2 * theta_var, sd)
        row = {"parts": [len(report.groups(p)["forget"]) for p in parts],
               "non_additivity": [float(np.sqrt(max(ms[groups[g]].mean(), 0.0))) for g in GROUPS],
               "mean": [float((0.5 * (e["oracle"] + e["floor"]) / sd)[groups[g]].mean()) for g in GROUPS],
               "dm_direct_slope": [float(crossed[groups[g]].mean() / ms[groups[g]].mean()) for g in GROUPS]}
        result["splits"][name] = row
        print(f"  {name} (parts of {row['parts']}): non-additivity "
              + " / ".join(f"{v:.2f}" for v in row["non_additivity"])
              + "  (mean " + " / ".join(f"{v:+.2f}" for v in row["mean"]) + "); DM-Direct's error on it: slope "
              + " / ".join(f"{v:+.2f}" for v in row["dm_direct_slope"]))
    names = list(split)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if len(split[a]) == len(split[b]):
                d = {s: sum(means[p, s] for p in split[b]) - sum(means[p, s] for p in split[a])
                     for s in ("oracle", "floor")}
                result["splits"][b][f"split_dependent_vs_{a}"] = values = rms(d["oracle"], d["floor"])
                print(f"  {a} vs {b}: the part that depends on the split " + " / ".join(f"{v:.2f}" for v in values))
    result["dm_direct_error"] = rms(direct_error["oracle"], direct_error["floor"], theta_var)
    print("  DM-Direct's error " + " / ".join(f"{v:.2f}" for v in result["dm_direct_error"]))

    rest_mean = theta[n:].mean(0)
    pooled = np.concatenate([sample["oracle"], sample["floor"]])
    extra_sd = np.sqrt(np.maximum(pooled.var(0) - theta.var(0), 0.0))
    z = np.random.default_rng(0).standard_normal((n, len(groups["forget"])))
    populations = {"dm-direct": report.margins(full, "dm-direct")[:n]}
    for name, parts in split.items():
        populations[f"parts:{name}"] = theta[:n] + sum(0.5 * (means[p, "oracle"] + means[p, "floor"]) - rest_mean
                                                       for p in parts)
    if args.spread:
        for name in list(populations):
            spread = populations[name].copy()
            spread[:, groups["forget"]] += z * extra_sd[groups["forget"]]
            populations[f"{name}+spread"] = spread
    scores = split_scores(sample["oracle"][:n], sample["floor"][:n], populations, groups, args.splits, seed=0)
    result["vs_floor"] = {name: quantiles(scores[name] / scores["floor"]) for name in populations}
    print(f"\nKLoM95 over the floor's, F / R / H, median [p10, p90] over {args.splits} draws of {n} oracles:")
    for name, q in result["vs_floor"].items():
        print(f"  {name}: " + " / ".join(f"{m:.2f} [{lo:.2f}, {hi:.2f}]"
                                         for m, lo, hi in zip(q["median"], q["p10"], q["p90"])))
    print(json.dumps({"bench": "additivity", **result}))


if __name__ == "__main__":
    main()
