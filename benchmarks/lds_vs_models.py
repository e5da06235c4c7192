"""How the datamodels' held-out LDS grows with the number m of subset models (digits + MLP, α = 0.5).

Trains max(m) + H subset models with the batched engine (GPU when present), fits the datamodels of
the held-out points on the first m fitting models for each m, and measures their LDS on the same H
held-out models. Writes a plot and prints one JSON line last.

Run: python benchmarks/lds_vs_models.py [--models 500 1000 2000 5000 10000] [--holdout 200] [--plot PATH]
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
from attribution.models import default_model
from attribution.recipes import default_recipe
from attribution.subsets import block_subsets


def train_subset_models(data, total: int, block: int, device: str, seed: int = 0):
    """Masks (total, n) and held-out logits (total, n_test, k) of `total` subset models."""
    model = default_model(data.name)
    recipe = default_recipe(data.name, model)
    masks, logits = [], []
    for b in tqdm(range(-(-total // block)), desc="subset models", unit="block"):
        m, seeds = block_subsets(seed, b, block, data.n_train, 0.5)
        masks.append(m)
        logits.append(train_batched(model, data, recipe, seeds, m, device=device).logits[:, data.n_train:].cpu())
    return np.concatenate(masks)[:total], torch.cat(logits)[:total].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, nargs="+", default=[500, 1000, 2000, 5000, 10000])
    parser.add_argument("--holdout", type=int, default=200)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--path-length", type=int, default=16)
    parser.add_argument("--plot", default="benchmarks/lds_vs_models.png")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = load_dataset("digits")
    start = time.perf_counter()
    masks, logits = train_subset_models(data, max(args.models) + args.holdout, args.block, device)
    train_s = time.perf_counter() - start
    hold_masks, hold_logits = masks[:args.holdout], logits[:args.holdout]
    labels = data.y_test.numpy()
    rows = []
    for m in args.models:
        t = time.perf_counter()
        fit = fit_target_chunk(masks[args.holdout:args.holdout + m], logits[args.holdout:args.holdout + m],
                               hold_masks, hold_logits, labels, path_length=args.path_length)
        rows.append({"models": m, "lds_per_class": summarize(fit.lds)["mean"],
                     "lds_margin": summarize(fit.lds_margin)["mean"], "fit_s": round(time.perf_counter() - t, 1)})
        print(f"m={m:>6}: held-out LDS per class {rows[-1]['lds_per_class']:.3f}, "
              f"margin {rows[-1]['lds_margin']:.3f} (fit {rows[-1]['fit_s']} s)", flush=True)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ms = [r["models"] for r in rows]
    ax.plot(ms, [r["lds_per_class"] for r in rows], "o-", label="per (x, c) logit")
    ax.plot(ms, [r["lds_margin"] for r in rows], "s-", label="margin")
    ax.set_xscale("log")
    ax.set_xlabel("subset models m (α = 0.5)")
    ax.set_ylabel("mean held-out LDS")
    ax.set_title("digits + MLP datamodels")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(json.dumps({"bench": "lds_vs_models", "device": device, "holdout_models": args.holdout,
                      "train_s": round(train_s, 1), "rows": rows, "plot": args.plot}))


if __name__ == "__main__":
    main()
