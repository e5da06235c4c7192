"""The report of `dmm evaluate`: results.csv/json, the raw margins, report.md and the plots.

One row per forget set × method. KLoM columns are the 95th percentile per group (forget F, retain S∖F,
held-out) of the per-point KLoM against the oracles; `retrain` is the second, independent oracle set,
so its KLoM is the floor no method can honestly beat.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

COLUMNS = ("forget_set", "method", "diverged", "klom95_forget", "klom95_retain", "klom95_heldout", "klom50_forget",
           "klom50_retain", "klom50_heldout", "klom95_other_forget", "klom95_other_retain", "klom95_other_heldout",
           "spread_forget", "spread_retain", "spread_heldout", "acc_forget", "acc_retain", "acc_heldout", "gap_forget",
           "gap_retain", "gap_heldout", "mia_svc", "mia_entropy", "ulira_auc", "relearn_steps", "weight_distance",
           "seconds", "cost_vs_retrain", "sample_grads", "grads_vs_retrain", "steps", "match_end")
GROUPS = ("forget", "retain", "heldout")


def slug(forget_set: str) -> str:
    """A file-name-safe name of a forget set spec (`random:50:0` -> `random_50_0`)."""
    if forget_set.startswith("ids:"):
        forget_set = "ids:" + Path(forget_set[4:]).stem
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", forget_set)


def result_row(forget_set: str, metrics: dict) -> dict:
    row = {"forget_set": forget_set, "method": metrics["method"], "diverged": metrics.get("diverged", 0)}
    for g in GROUPS:
        row[f"klom95_{g}"] = metrics["klom"][g]["p95"]
        row[f"klom50_{g}"] = metrics["klom"][g]["median"]
        # klom_other and spread are absent from metrics cached before they were added
        row[f"klom95_other_{g}"] = metrics["klom_other"][g]["p95"] if "klom_other" in metrics else None
        row[f"spread_{g}"] = metrics.get("spread", {}).get(g)
        row[f"acc_{g}"] = metrics["accuracy"][g]
        row[f"gap_{g}"] = metrics["accuracy_gap"][g]
    for key in ("mia_svc", "mia_entropy", "ulira_auc", "relearn_steps", "weight_distance", "seconds",
                "cost_vs_retrain", "sample_grads", "grads_vs_retrain"):
        row[key] = metrics[key]
    matching = metrics.get("matching") or {}
    row["steps"] = matching.get("steps")
    row["match_end"] = matching["loss_end"] / matching["loss_start"] if matching.get("loss_start") else None
    return row


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def markdown_table(rows: list[dict], columns) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "\n".join("| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows) + "\n"


def write_tables(out: Path, rows: list[dict], direction: str, n_models: int, code: dict) -> None:
    """results.csv, results.json and report.md; `code` (`evaluate.code_provenance`) closes the report and
    results.json names the stages other code computed."""
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps({"klom_direction": direction, "models": n_models, "rows": rows,
                                                  "code": code["fingerprint"],
                                                  "stages_by_other_code": code["other"]}, indent=1))
    main = ("method", "klom95_forget", "klom95_retain", "klom95_heldout", "klom95_other_forget", "spread_forget",
            "acc_forget", "acc_retain", "acc_heldout", "mia_svc", "mia_entropy", "ulira_auc", "relearn_steps", "steps",
            "match_end", "cost_vs_retrain", "grads_vs_retrain", "diverged")
    parts = [f"# Unlearning evaluation\n\nKLoM = binned KL between margin distributions over N = {n_models} "
             f"models per population, direction KL({direction.replace('||', ' ‖ ')}); columns klom95_* are "
             "the 95th percentile over the points of each group. `retrain` is a second, independent set of "
             "oracles: its KLoM is the noise floor. spread_* = the population's mean margin sd over the oracles' "
             "(KL(oracle ‖ unlearned) falls as a population widens: a low KLoM with a spread well above 1 is "
             "noise, not forgetting); klom95_other_* = KLoM95 in the other direction, which rewards a narrow "
             "population as KL(oracle ‖ unlearned) rewards a wide one: a method far ahead in one direction and "
             "behind in the other is not near the oracles. mia_* = fraction of F predicted non-member; "
             "ulira_auc 0.5 = indistinguishable from retraining; steps = optimiser steps of the method's fine-tuning; "
             "match_end = DMM/OM's matching loss at the end over its start, means over the models (above 1: the "
             "fine-tuning moved away from its targets, whatever KLoM says); cost_vs_retrain = "
             "seconds per model / one retrain; grads_vs_retrain = per-sample gradient evaluations / one retrain's; "
             "diverged = models whose logits are not finite, left out of every other column.\n"]
    for fs in dict.fromkeys(r["forget_set"] for r in rows):
        parts.append(f"\n## Forget set `{fs}`\n\n" + markdown_table([r for r in rows if r["forget_set"] == fs], main))
    parts.append("\n![KLoM per group](klom_per_group.png)\n\n![KLoM vs cost](klom_vs_cost.png)\n\n"
                 f"![margin histograms](margin_histograms.png)\n\n{code['note']}\n")
    (out / "report.md").write_text("".join(parts))


def write_margins(out: Path, forget_set: str, margins: dict[str, np.ndarray], groups: dict[str, np.ndarray]) -> None:
    """margins/<set>/<method>.npy (N × P float32, train points first), oracle.npy, floor.npy, groups.json."""
    folder = out / "margins" / slug(forget_set)
    folder.mkdir(parents=True, exist_ok=True)
    for name, values in margins.items():
        np.save(folder / f"{name}.npy", np.asarray(values, dtype=np.float32))
    (folder / "groups.json").write_text(json.dumps({g: np.asarray(v).tolist() for g, v in groups.items()}))


def read_groups(folder: Path) -> dict[str, np.ndarray]:
    """The point ids of each group that `write_margins` saved in a margins/<set>/ folder."""
    return {g: np.asarray(v) for g, v in json.loads((folder / "groups.json").read_text()).items()}
