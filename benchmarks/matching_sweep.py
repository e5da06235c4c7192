"""The table behind DMM's matching defaults: KLoM of every DMM variant of a sweep against DM-Direct and the floor.

Reads the results.csv of `dmm evaluate` runs of the sweep configs (configs/sweep_dmm_*.yaml) and, per
forget set and variant, prints KLoM95 forget / retain / held-out and the two ratios issue 13 targets on
every group: DMM / DM-Direct (target ≤ 1.15) and DMM / floor (the `retrain` row, target ≤ 2); and the matching
loss at the end over its start (`match_end`, ✗ above 1: the matching moved away from its targets).
One JSON line last: for each variant, the worst ratio of each kind over every setting and group.

Run: python benchmarks/matching_sweep.py sweep_out/digits/results.csv sweep_out/mnist1d/results.csv
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

GROUPS = ("forget", "retain", "heldout")
DIRECT_TARGET, FLOOR_TARGET = 1.15, 2.0


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def klom(row: dict) -> list[float]:
    return [float(row[f"klom95_{g}"]) for g in GROUPS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="+", type=Path, help="results.csv of `dmm evaluate` runs")
    args = parser.parse_args()
    worst: dict[str, dict[str, float]] = {}
    print("| run | forget set | variant | KLoM95 F / R / H | vs DM-Direct (max) | vs floor (max) | steps "
          "| L end / start |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.results:
        run = path.parent.name
        rows = read_rows(path)
        for fs in dict.fromkeys(r["forget_set"] for r in rows):
            by_method = {r["method"]: r for r in rows if r["forget_set"] == fs}
            direct, floor = klom(by_method["dm-direct"]), klom(by_method["retrain"])
            for method, row in by_method.items():
                if method.split("@")[0] not in ("dmm", "dm-direct"):
                    continue
                values = klom(row)
                vs_direct = max(v / d for v, d in zip(values, direct))
                vs_floor = max(v / f for v, f in zip(values, floor))
                mine = worst.setdefault(f"{run}:{method}", {"vs_direct": 0.0, "vs_floor": 0.0})
                mine["vs_direct"] = round(max(mine["vs_direct"], vs_direct), 3)
                mine["vs_floor"] = round(max(mine["vs_floor"], vs_floor), 3)
                steps = f"{float(row['steps']):.0f}" if row.get("steps") else "—"
                match_end = "—"
                if row.get("match_end"):  # absent from results.csv written before the column was added
                    mine["match_end"] = round(max(mine.get("match_end", 0.0), float(row["match_end"])), 3)
                    match_end = f"{float(row['match_end']):.2f}" + (" ✗" if float(row["match_end"]) > 1 else "")
                print(f"| {run} | {fs} | {method} | {' / '.join(f'{v:.2f}' for v in values)} | "
                      f"{vs_direct:.2f}{'' if vs_direct <= DIRECT_TARGET else ' ✗'} | "
                      f"{vs_floor:.2f}{'' if vs_floor <= FLOOR_TARGET else ' ✗'} | {steps} | {match_end} |")
    print(json.dumps({"bench": "matching_sweep", "targets": {"vs_direct": DIRECT_TARGET, "vs_floor": FLOOR_TARGET},
                      "worst": worst}))


if __name__ == "__main__":
    main()
