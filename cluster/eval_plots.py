"""Plots of `dmm evaluate` (matplotlib, written as PNG): KLoM per group, KLoM vs cost, margin histograms."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from attribution.errors import DmmError

GROUP_LABELS = {"forget": "forget F", "retain": "retain S∖F", "heldout": "held-out"}


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DmmError("the report's plots need matplotlib; pip install matplotlib (or the [plots] extra)") from None
    return plt


def _methods(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _colors(plt, names):
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def plot_klom_per_group(rows: list[dict], path: Path, direction: str, n_models: int) -> None:
    """One panel per forget set: KLoM 95th percentile per group, one bar per method; `retrain` = floor."""
    plt = _pyplot()
    sets = list(dict.fromkeys(r["forget_set"] for r in rows))
    methods = _methods(rows)
    colors = _colors(plt, methods)
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets) + 1.5, 4.2), squeeze=False, sharey=True)
    width = 0.8 / len(methods)
    for ax, fs in zip(axes[0], sets):
        by_method = {r["method"]: r for r in rows if r["forget_set"] == fs}
        for j, m in enumerate(methods):
            values = [by_method[m][f"klom95_{g}"] for g in GROUP_LABELS]
            ax.bar(np.arange(3) + (j - (len(methods) - 1) / 2) * width, values, width, color=colors[m], label=m,
                   hatch="//" if m == "retrain" else None, edgecolor="black", linewidth=0.4)
        if "retrain" in by_method:
            for g, x in zip(GROUP_LABELS, range(3)):
                ax.hlines(by_method["retrain"][f"klom95_{g}"], x - 0.45, x + 0.45, colors="black", linestyles="--",
                          linewidth=0.8)
        ax.set_xticks(range(3), list(GROUP_LABELS.values()))
        ax.set_title(f"forget set {fs}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("KLoM, 95th percentile over points")
    axes[0][-1].legend(title="method (retrain = floor, dashed)", loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"KLoM against {n_models} oracles, KL({direction.replace('||', ' ‖ ')}); lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COST_AXES = {"cost_vs_retrain": "wall time per request / one retrain",
             "grads_vs_retrain": "per-sample gradients per request / one retrain's"}


def plot_klom_vs_cost(rows: list[dict], path: Path) -> None:
    """KLoM on F (95th pct) against a request's cost relative to one retrain (log x), in two panels:
    wall time and per-sample gradient evaluations — the count that does not depend on the machine."""
    plt = _pyplot()
    sets = list(dict.fromkeys(r["forget_set"] for r in rows))
    methods = _methods(rows)
    colors = _colors(plt, methods)
    markers = "osD^vP*X"
    fig, axes = plt.subplots(1, len(COST_AXES), figsize=(12, 4.8), sharey=True)
    for ax, (key, label) in zip(axes, COST_AXES.items()):
        positive = [r[key] for r in rows if r[key] > 0]
        floor_x = min(positive) / 10 if positive else 1e-3
        for i, fs in enumerate(sets):
            for r in (r for r in rows if r["forget_set"] == fs):
                ax.scatter(max(r[key], floor_x), r["klom95_forget"], color=colors[r["method"]],
                           marker=markers[i % len(markers)], s=55, edgecolor="black", linewidth=0.4)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linestyle=":", linewidth=0.8)
        ax.set_xlabel(f"{label} (log; 0 drawn at {floor_x:.1g})")
        ax.grid(alpha=0.3)
    for m in methods:
        axes[-1].scatter([], [], color=colors[m], label=m)
    for i, fs in enumerate(sets):
        axes[-1].scatter([], [], color="gray", marker=markers[i % len(markers)], label=f"set {fs}")
    axes[0].set_ylabel("KLoM on F, 95th percentile")
    fig.suptitle("Forgetting quality vs compute (lower left is better; retrain at x = 1)")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_margin_histograms(forget_set: str, oracle: np.ndarray, populations: dict[str, np.ndarray],
                           klom_values: dict[str, np.ndarray], points: np.ndarray, path: Path) -> None:
    """Oracle vs unlearned margin histograms at a few forget points (rows) for every method (columns)."""
    plt = _pyplot()
    names = list(populations)
    fig, axes = plt.subplots(len(points), len(names), figsize=(2.6 * len(names), 2.1 * len(points)),
                             squeeze=False)
    for i, x in enumerate(points):
        for j, name in enumerate(names):
            ax = axes[i][j]
            values = np.concatenate([oracle[:, x], populations[name][:, x]])
            bins = np.linspace(values.min(), values.max() + 1e-9, 21)
            ax.hist(oracle[:, x], bins, alpha=0.55, color="tab:gray", label="oracles")
            ax.hist(populations[name][:, x], bins, alpha=0.55, color="tab:red", label=name)
            ax.set_title(f"{name}: point {x}, KLoM {klom_values[name][x]:.2f}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(points) - 1:
                ax.set_xlabel("margin", fontsize=8)
        axes[i][0].set_ylabel("models", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Margins at forget points of {forget_set}: oracles (gray) vs each method (red)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
