"""How a deletion's mean effect moves with its size, and what DM-Direct's size term makes of it.

A retrain on S∖F runs the recipe on n − |F| points, so it takes ceil((n − |F|) / batch) steps per epoch, its last
batch partial; DM-Direct's size term is linear in |F| (README, "The training set's size in DM-Direct"). Reads every
forget set of a `dmm evaluate` report (margins/<set>/: nothing, oracle, floor, dm-direct, groups.json) and, on the
points that no set of the report deletes (so each set's shift there is its deletion's effect on points it keeps),
prints per set, by size: |F|, the steps per epoch and the last batch's size of a retrain, the oracles' mean margin
shift from θ0's (both oracle samples pooled) in margin and in oracle sd (per point, the set's oracles' sd over
seeds), and DM-Direct's mean error there in oracle sd (its mean margin minus the oracles'). A shift that does not
grow with |F| where the steps stay the same, or jumps where one is lost, is the recipe's batching, which a term
linear in |F| cannot follow (docs/matching_sweeps.md, "Deleting 200 random points is not additive").
With --plot FILE it also draws both means against |F|, one colour per steps-per-epoch count (PNG).
One JSON line last: {"bench": "size_staircase", "batch_size": ..., "points": ..., "sets": {set: {...}}}.

Run: python benchmarks/size_staircase.py sweep_out/additivity_digits --batch-size 64 --plot staircase.png
(after `dmm evaluate --config configs/sweep_additivity_digits.yaml --out sweep_out/additivity_digits`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.eval_plots import _pyplot, _save  # noqa: E402
from cluster.eval_report import read_groups  # noqa: E402

POPULATIONS = ("nothing", "oracle", "floor", "dm-direct")


def read_set(folder: Path) -> dict:
    missing = [p for p in POPULATIONS if not (folder / f"{p}.npy").exists()]
    if missing:
        raise SystemExit(f"error: {folder} has no {', '.join(missing)}.npy; run `dmm evaluate` with `nothing`, "
                         "`retrain` and `dm-direct` in methods")
    groups = read_groups(folder)
    return {"forget": np.asarray(groups["forget"]), "n_train": len(groups["forget"]) + len(groups["retain"]),
            **{p: np.load(folder / f"{p}.npy").astype(np.float64) for p in POPULATIONS}}


def set_row(data: dict, keep: np.ndarray, batch_size: int) -> dict:
    """One set's size, a retrain's steps per epoch and last batch, and the mean shift and error on `keep`."""
    n = data["n_train"] - len(data["forget"])
    steps = -(-n // batch_size)
    oracles = np.concatenate([data["oracle"], data["floor"]])
    sd = oracles.std(0, ddof=1)[keep]
    shift = (oracles.mean(0) - data["nothing"].mean(0))[keep]
    error = (data["dm-direct"].mean(0) - oracles.mean(0))[keep]
    return {"size": len(data["forget"]), "steps_per_epoch": steps, "last_batch": n - (steps - 1) * batch_size,
            "shift": float(shift.mean()), "shift_sd": float((shift / sd).mean()),
            "dm_direct_error_sd": float((error / sd).mean())}


def plot(rows: dict, batch_size: int, path: Path) -> None:
    """The oracles' mean shift and DM-Direct's mean error (oracle sd) against |F|, coloured by steps per epoch."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6), sharex=True)
    steps = sorted({row["steps_per_epoch"] for row in rows.values()}, reverse=True)
    colours = {s: plt.get_cmap("viridis")(i / max(len(steps) - 1, 1)) for i, s in enumerate(steps)}
    for ax, key, label in ((axes[0], "shift_sd", "oracles' mean shift from θ0 (oracle sd)"),
                           (axes[1], "dm_direct_error_sd", "DM-Direct's mean error (oracle sd)")):
        for s in steps:
            chosen = [row for row in rows.values() if row["steps_per_epoch"] == s]
            ax.scatter([row["size"] for row in chosen], [row[key] for row in chosen], color=colours[s], s=18,
                       label=f"{s} steps per epoch")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("|F|")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"On the points no set deletes; batch {batch_size}, the last batch partial", fontsize=9)
    _save(plt, fig, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="the --out folder of a `dmm evaluate` run")
    parser.add_argument("--batch-size", type=int, required=True, help="the recipe's batch size (digits: 64)")
    parser.add_argument("--plot", type=Path, help="also draw the two means against |F| into this PNG")
    args = parser.parse_args()
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be at least 1; e.g. --batch-size 64")
    folders = sorted(p for p in (args.report / "margins").glob("*/") if (p / "groups.json").exists())
    if not folders:
        raise SystemExit(f"error: {args.report / 'margins'} holds no forget set; pass the --out folder of a "
                         "`dmm evaluate` run")
    sets = {f.name: read_set(f) for f in folders}
    points = next(iter(sets.values()))["nothing"].shape[1]
    keep = np.setdiff1d(np.arange(points), np.concatenate([s["forget"] for s in sets.values()]))
    rows = {name: set_row(data, keep, args.batch_size) for name, data in sets.items()}
    print(f"On the {len(keep)} points no set deletes; batch {args.batch_size}; shifts and errors are means over them")
    print("| set | \\|F\\| | steps per epoch | last batch | oracles' shift from θ0 | in oracle sd "
          "| DM-Direct's error (sd) |")
    print("|---|---|---|---|---|---|---|")
    for name, row in sorted(rows.items(), key=lambda item: (item[1]["size"], item[0])):
        print(f"| {name} | {row['size']} | {row['steps_per_epoch']} | {row['last_batch']} | {row['shift']:+.3f} | "
              f"{row['shift_sd']:+.2f} | {row['dm_direct_error_sd']:+.2f} |")
    if args.plot:
        plot(rows, args.batch_size, args.plot)
    print(json.dumps({"bench": "size_staircase", "batch_size": args.batch_size, "points": int(len(keep)),
                      "sets": rows}))


if __name__ == "__main__":
    main()
