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


def _set_label(forget_set: str) -> str:
    """A forget set as a plot names it: `ids:/long/path/to/forget_ids.txt` → `ids:forget_ids.txt` (the report's
    tables keep the full spec)."""
    kind, _, rest = forget_set.partition(":")
    return f"{kind}:{Path(rest).name}" if kind == "ids" else forget_set


def _save(plt, fig, path: Path, dpi: int) -> None:
    """Laid out, saved with every label inside the image (a long title widens it rather than being cut off)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def _methods(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _base(method: str) -> str:
    """`salun@mask0.2` → `salun`: a variant shares its method's colour and is drawn hollow."""
    return method.split("@", 1)[0]


def _colors(plt, names):
    """One colour per name while 20 colours suffice, else one per method (its variants share it): tab10,
    tab20, or turbo sampled evenly beyond 20."""
    keys = list(dict.fromkeys(names if len(names) <= 20 else map(_base, names)))
    if len(keys) <= 20:
        cmap = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")
        palette = [cmap(i) for i in range(len(keys))]
    else:
        palette = [plt.get_cmap("turbo")(x) for x in np.linspace(0.03, 0.97, len(keys))]
    by_key = dict(zip(keys, palette))
    return {name: by_key[name] if name in by_key else by_key[_base(name)] for name in names}


def _style(colors, method: str) -> dict:
    """Scatter style: filled for a method at its defaults, hollow (coloured edge) for a variant."""
    if "@" in method:
        return {"facecolors": "none", "edgecolors": colors[method], "linewidths": 1.4}
    return {"color": colors[method], "edgecolors": "black", "linewidths": 0.4}


GROUP_MARKERS = {"forget": "o", "retain": "s", "heldout": "^"}


def plot_klom_per_group(rows: list[dict], path: Path, direction: str, n_models: int) -> None:
    """One panel per forget set, one line per method: KLoM 95th percentile of each group (F ●, R ■, H ▲),
    hollow for a variant; the floor (`retrain`) as a dashed line per group. Scales to any number of methods."""
    plt = _pyplot()
    sets = list(dict.fromkeys(r["forget_set"] for r in rows))
    methods = _methods(rows)
    colors = _colors(plt, methods)
    fig, axes = plt.subplots(1, len(sets), figsize=(4.4 * len(sets) + 1.5, 1.2 + 0.27 * len(methods)),
                             squeeze=False, sharey=True)
    for ax, fs in zip(axes[0], sets):
        by_method = {r["method"]: r for r in rows if r["forget_set"] == fs}
        for y, m in enumerate(methods):
            for g, marker in GROUP_MARKERS.items():
                ax.scatter(by_method[m][f"klom95_{g}"], y, marker=marker, s=40, **_style(colors, m))
        if "retrain" in by_method:
            for g, marker in GROUP_MARKERS.items():
                ax.axvline(by_method["retrain"][f"klom95_{g}"], color="black", linestyle="--", linewidth=0.7)
        ax.set_yticks(range(len(methods)), methods, fontsize=8)
        ax.set_title(f"forget set {_set_label(fs)}")
        ax.set_xlabel("KLoM, 95th percentile over points")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()  # once: the panels share their y-axis, and a second inversion would undo it
    for g, marker in GROUP_MARKERS.items():
        axes[0][-1].scatter([], [], marker=marker, color="gray", label=GROUP_LABELS[g])
    axes[0][-1].legend(title="group (dashed: the floor)", loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.suptitle(f"KLoM against {n_models} oracles, KL({direction.replace('||', ' ‖ ')}); lower is better, "
                 "hollow = a variant")
    _save(plt, fig, path, dpi=110)


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
    entries = len(methods) + len(sets)
    columns = 1 + entries // 30
    fig, axes = plt.subplots(1, len(COST_AXES), figsize=(12 + 1.8 * columns, max(4.8, 1.2 + 0.16 * entries / columns)),
                             sharey=True)
    for ax, (key, label) in zip(axes, COST_AXES.items()):
        positive = [r[key] for r in rows if r[key] > 0]
        floor_x = min(positive) / 10 if positive else 1e-3
        for i, fs in enumerate(sets):
            for r in (r for r in rows if r["forget_set"] == fs):
                ax.scatter(max(r[key], floor_x), r["klom95_forget"], marker=markers[i % len(markers)], s=55,
                           **_style(colors, r["method"]))
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linestyle=":", linewidth=0.8)
        ax.set_xlabel(f"{label} (log; 0 drawn at {floor_x:.1g})")
        ax.grid(alpha=0.3)
    for m in methods:
        axes[-1].scatter([], [], marker="o", label=m, **_style(colors, m))
    for i, fs in enumerate(sets):
        axes[-1].scatter([], [], color="gray", marker=markers[i % len(markers)], label=f"set {_set_label(fs)}")
    axes[0].set_ylabel("KLoM on F, 95th percentile")
    fig.suptitle("Forgetting quality vs compute (lower left is better; retrain at x = 1; hollow = a variant)")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, ncol=columns)
    _save(plt, fig, path, dpi=110)


HISTOGRAM_COLUMNS = 8
ALWAYS_SHOWN = ("nothing", "retrain", "dm-direct", "dmm", "om")


def histogram_range(oracle: np.ndarray, population: np.ndarray) -> tuple[float, float]:
    """The margins a histogram panel spans: all of the oracles', and the population's within Tukey's far
    fences (3 interquartile ranges beyond its quartiles), so that runaway models (a method that nearly
    diverged on a quarter of its models: margins of 1e17) cannot squash the rest into one bin."""
    q1, q3 = np.percentile(population, [25, 75])
    low, high = max(population.min(), q1 - 3 * (q3 - q1)), min(population.max(), q3 + 3 * (q3 - q1))
    return float(min(oracle.min(), low)), float(max(oracle.max(), high))


def plot_margin_histograms(forget_set: str, oracle: np.ndarray, populations: dict[str, np.ndarray],
                           klom_values: dict[str, np.ndarray], points: np.ndarray, path: Path) -> None:
    """Oracle vs unlearned margin histograms at a few forget points (rows) for up to HISTOGRAM_COLUMNS
    methods (columns): the ones in `ALWAYS_SHOWN`, then the rest by their mean KLoM at those points; each
    panel spans `histogram_range`, models beyond it counted in its title and drawn in its edge bins."""
    plt = _pyplot()
    shown = [m for m in populations if m in ALWAYS_SHOWN]
    others = sorted((m for m in populations if m not in ALWAYS_SHOWN), key=lambda m: float(klom_values[m][points].mean()))
    names = (shown + others)[:max(HISTOGRAM_COLUMNS, len(shown))]
    fig, axes = plt.subplots(len(points), len(names), figsize=(2.6 * len(names), 2.1 * len(points)),
                             squeeze=False)
    for i, x in enumerate(points):
        for j, name in enumerate(names):
            ax = axes[i][j]
            population = populations[name][:, x]
            lo, hi = histogram_range(oracle[:, x], population)
            bins = np.linspace(lo, hi + 1e-9, 21)
            outside = int(((population < lo) | (population > hi)).sum())
            ax.hist(oracle[:, x], bins, alpha=0.55, color="tab:gray", label="oracles")
            ax.hist(np.clip(population, lo, hi), bins, alpha=0.55, color="tab:red", label=name)
            ax.set_title(f"{name}: point {x}, KLoM {klom_values[name][x]:.2f}"
                         + (f"\n{outside} model(s) beyond, drawn at the edges" if outside else ""), fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(points) - 1:
                ax.set_xlabel("margin", fontsize=8)
        axes[i][0].set_ylabel("models", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Margins at forget points of {_set_label(forget_set)}: oracles (gray) vs each method (red); "
                 f"the methods beyond {', '.join(shown)}: the {len(names) - len(shown)} of lowest KLoM there", fontsize=10)
    _save(plt, fig, path, dpi=100)
