"""How the datamodels' held-out LDS grows with the number m of subset models (digits + MLP, α = 0.5),
for the default MLP (width 256) and the width-32 MLP it replaced.

For each width: trains max(m) + H subset models with the batched engine (GPU when present), fits the
datamodels of the held-out points on the first m fitting models for each m, and measures their LDS on
the same H held-out models: per (x, c) logit, and of the margin computed from the k predicted logits.
Also times training and fitting per model. Writes a plot and prints one JSON line last.

Run: python benchmarks/lds_vs_models.py [--models 500 1000 2000 5000 10000] [--holdout 200] [--widths 32 256]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from tqdm import tqdm

from attribution.datamodels import fit_target_chunk
from attribution.datasets import load_dataset
from attribution.engine import train_batched
from attribution.lds import summarize
from attribution.models import mlp
from attribution.recipes import default_recipe
from attribution.subsets import block_subsets

DEFAULT_WIDTH = 256  # attribution.models.mlp's


def narrow_mlp(input_shape, num_classes):
    """The width-32 digits MLP of earlier releases (for the comparison)."""
    return mlp(input_shape, num_classes, hidden=(32,))


MODEL_OF_WIDTH = {DEFAULT_WIDTH: "mlp", 32: "__main__:narrow_mlp"}


def train_subset_models(data, model: str, total: int, block: int, device: str, seed: int = 0):
    """Masks (total, n) and held-out logits (total, n_test, k) of `total` subset models."""
    recipe = default_recipe(data.name)
    masks, logits = [], []
    for b in tqdm(range(-(-total // block)), desc=f"subset models ({model})", unit="block"):
        m, seeds = block_subsets(seed, b, block, data.n_train, 0.5)
        masks.append(m)
        logits.append(train_batched(model, data, recipe, seeds, m, device=device).logits[:, data.n_train:].cpu())
    return np.concatenate(masks)[:total], torch.cat(logits)[:total].numpy()


def lds_rows(data, width: int, args, device: str) -> list[dict]:
    start = time.perf_counter()
    total = max(args.models) + args.holdout
    masks, logits = train_subset_models(data, MODEL_OF_WIDTH[width], total, args.block, device)
    train_ms = (time.perf_counter() - start) / total * 1e3
    hold_masks, hold_logits = masks[:args.holdout], logits[:args.holdout]
    labels = data.y_test.numpy()
    rows = []
    for m in args.models:
        t = time.perf_counter()
        fit = fit_target_chunk(masks[args.holdout:args.holdout + m], logits[args.holdout:args.holdout + m],
                               hold_masks, hold_logits, labels, path_length=args.path_length)
        fit_s = time.perf_counter() - t
        rows.append({"width": width, "models": m, "lds_per_class": summarize(fit.lds)["mean"],
                     "lds_margin": summarize(fit.lds_margin)["mean"], "fit_s": round(fit_s, 1),
                     "fit_ms_per_model": round(fit_s / m * 1e3, 2), "train_ms_per_model": round(train_ms, 2)})
        print(f"width {width}, m={m:>6}: held-out LDS per class {rows[-1]['lds_per_class']:.3f}, margin "
              f"{rows[-1]['lds_margin']:.3f} (fit {fit_s:.1f} s; training {train_ms:.1f} ms per model)", flush=True)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for width, style in zip(sorted({r["width"] for r in rows}), ("--", "-")):
        mine = [r for r in rows if r["width"] == width]
        ms = [r["models"] for r in mine]
        ax.plot(ms, [r["lds_per_class"] for r in mine], "o" + style, color="tab:blue",
                label=f"per (x, c) logit, width {width}")
        ax.plot(ms, [r["lds_margin"] for r in mine], "s" + style, color="tab:orange", label=f"margin, width {width}")
    ax.axhline(0.8, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("subset models m (α = 0.5)")
    ax.set_ylabel("mean held-out LDS")
    ax.set_title("digits + MLP datamodels")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, nargs="+", default=[500, 1000, 2000, 5000, 10000])
    parser.add_argument("--holdout", type=int, default=200)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, DEFAULT_WIDTH], choices=list(MODEL_OF_WIDTH))
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--path-length", type=int, default=16)
    parser.add_argument("--plot", default="benchmarks/lds_vs_models.png")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = load_dataset("digits")
    rows = [row for width in args.widths for row in lds_rows(data, width, args, device)]
    plot(rows, args.plot)
    print(json.dumps({"bench": "lds_vs_models", "device": device, "holdout_models": args.holdout,
                      "rows": rows, "plot": args.plot}))


if __name__ == "__main__":
    main()
