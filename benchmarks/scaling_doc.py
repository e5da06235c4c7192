"""Writes docs/scaling.md (issue 16 point 5) from bench_scale.py's JSON and measured or cited training times.

    python benchmarks/bench_scale.py > scale.txt
    python benchmarks/scaling_doc.py --bench scale.txt [--training training.txt] [--iter-store demo_out/store.zarr] \
        > docs/scaling.md

Every number in the doc is either computed from the array shapes, read from the benchmark's last JSON line,
measured by this script (FISTA iterations per regression: the real solver on `--iter-targets` targets of a
fitted store, default settings), or cited below with its source. Nothing else.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attribution.fit_memory import task_bytes  # noqa: E402

# ---------------------------------------------------------------- cited (source in the doc)
FFCV_RESNET9_A100_S = 36.0  # ResNet-9 on CIFAR-10 to 92.6 % on one A100 (FFCV, by the datamodels authors)
AIRBENCH94_A100_S = 3.83  # to 94 % on one A100 (Jordan 2024, airbench94.py)
A100_FP32_TFLOPS, A100_TF32_TFLOPS = 19.5, 156.0  # NVIDIA A100 datasheet, dense
DIGITS_MLP_S, MNIST1D_CNN_S = 0.1195, 6.34  # measured here, recorded in README.md ("Datamodel quality", "Performance")
PAPER_MODELS_ALPHA50 = 300_000  # datamodels trained at α = 50 % on CIFAR-10 (datamodels-data README, Table 1)
SOURCES = {
    "ffcv": "https://docs.ffcv.io/ffcv_examples/cifar10.html",
    "airbench": "https://arxiv.org/abs/2404.00498",
    "a100": "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
    "datamodels": "https://github.com/MadryLab/datamodels-data (Ilyas et al. 2022, arXiv:2202.00622)",
}

CIFAR = {"n": 50_000, "p": 60_000, "k": 10, "m": 50_000, "T": 256, "block": 64, "holdout": 100, "val": 0.1}
IMAGENET = {"n": 1_281_167, "p": 1_281_167 + 50_000, "k": 1000}


def last_json(path: str) -> dict:
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"{path} holds no JSON line; fix: pass the output of the benchmark")
    return json.loads(lines[-1])


def human(nbytes: float) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.0f} B"


def measure_iterations(url: str, targets: int, tol: float | None = None) -> dict:
    """FISTA iterations per regression (λ path + refit, summed over columns) of the real solver with `dmm fit`'s
    default λ path and tolerance (or `tol`), on the first `targets` targets of a fitted store's subset models."""
    import attribution.lasso as lasso
    from attribution.datamodels import fit_target_chunk
    from attribution.lds import holdout_split
    from attribution.store import AttributionStore
    from cluster.fit import FitConfig

    config = FitConfig() if tol is None else FitConfig(tol=tol)

    store = AttributionStore.open(url)
    blocks = store.completed_blocks()
    masks, logits = store.read_masks(blocks), store.read_logits(blocks, targets=slice(0, targets))
    fit_rows, lds_rows = holdout_split(len(masks), CIFAR["holdout"])
    calls, real = [], lasso.fista

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(int(out[2].sum()))  # iterations of every column of this call
        return out

    lasso.fista = counting
    try:
        start = time.perf_counter()
        fit_target_chunk(masks[fit_rows], logits[fit_rows], masks[lds_rows], logits[lds_rows],
                         np.zeros(targets, dtype=np.int64), path_length=config.path_length, tol=config.tol,
                         max_iter=config.max_iter)
        seconds = time.perf_counter() - start
    finally:
        lasso.fista = real
    regressions = targets * store.spec.num_classes
    return {"store": url, "n": store.spec.n_train, "models": len(masks), "regressions": regressions, "tol": config.tol,
            "iterations_per_regression": sum(calls) / regressions, "seconds": seconds}


def fit_flops(n: int, p: int, k: int, m: int, iters: float, val: float, holdout: int) -> dict:
    """The fit's multiply-adds ×2, by term (`lasso_stats`, `fista`): the shared Gram once, then per regression
    the correlations Xᵀy over the fitting models, I FISTA iterations of G·w, and the LDS prediction."""
    fitting = m - holdout
    t = p * k
    return {"design (XᵀX, once)": 2.0 * fitting * n * n, "correlations Xᵀy": 2.0 * fitting * n * t,
            "FISTA G·w": 2.0 * n * n * t * iters, "LDS predictions": 2.0 * holdout * n * t}


def array_rows(c: dict, dm_row_ratio: float, trak_row_ratio: float, logit_ratio: float) -> list[tuple]:
    """(array, shape, raw bytes, stored bytes (estimate), objects) at scale c, using the benchmark's measured
    stored/raw ratios of random logits and of 9 %-dense and dense β rows."""
    n, p, k, m, T, bs = c["n"], c["p"], c["k"], c["m"], c["T"], c["block"]
    pc, nb = math.ceil(p / T), math.ceil(m / bs)
    beta = n * p * k * 4
    rows = [("subsets/masks", f"{m:,} × {n:,} bool", m * n, None, nb),
            ("subsets/logits", f"{m:,} × {p:,} × {k}", m * p * k * 4, m * p * k * 4 * logit_ratio, nb),
            ("subsets/done", f"{nb:,}", nb, None, nb)]
    for prefix, ratio in (("datamodels", dm_row_ratio), ("trak", trak_row_ratio)):
        rows += [(f"{prefix}/weight", f"{n:,} × {p:,} × {k}", beta, beta * ratio, n * pc),
                 (f"{prefix}/weight_rows", f"{n:,} × {p:,} × {k}", beta, beta * ratio, n),
                 (f"{prefix}/bias, lam, lds", f"{p:,} × {k}", 3 * p * k * 4, None, 3 * pc),
                 (f"{prefix}/lds_margin, done", f"{p:,}", p * 4 + pc, None, 2 * pc)]
    rows.append(("original/logits", f"{p:,} × {k}", p * k * 4, None, 1))
    return rows


def render(bench: dict, training: dict | None, iters: dict | None, sparse: dict | None) -> str:
    c = CIFAR
    big = bench["rows"][-1]
    exps = bench["exponents"]
    p_b = big["p"]
    req = {prefix: {q["forget"]: q for q in big[prefix]} for prefix in ("datamodels", "trak")}
    top_f = max(req["datamodels"])
    row_bytes = {prefix: req[prefix][top_f]["mb_read"] * 1e6 / top_f for prefix in req}  # stored bytes a row
    ratio = {prefix: row_bytes[prefix] / (p_b * 10 * 4) for prefix in req}
    logit_ratio = big["stored_mb"] * 1e6 / (big["models"] * (big["n"] + p_b * 40))
    out = ["# Scaling: the store and the fit at CIFAR-10 and ImageNet scale", "",
           "Written by `benchmarks/scaling_doc.py` from `benchmarks/bench_scale.py`'s JSON (synthetic stores at "
           f"n = {', '.join(f'{n:,}' for n in bench['sizes'])}, p = 1.2 n, k = 10, m = {bench['models']} models, "
           f"β rows {bench['beta_density']:.0%} non-zero for datamodels, dense for TRAK) and the training times "
           "cited or measured below; rerun both to refresh it. Bytes are decimal (1 GB = 10⁹ B).", "",
           "## Measured here (bench_scale)", "",
           "| n | p | write models/s | write MB/s | fit read amplification | design s | solve s (targets) "
           "| fit peak RSS MB | DM request \\|F\\|=1000 | TRAK request \\|F\\|=1000 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in bench["rows"]:
        fit = (f"{r['fit_read_amplification']:.2f} | {r['design_s']:.1f} | {r['solve_s']:.1f} ({r['solved_targets']}) | "
               f"{r['fit_peak_rss_mb']:.0f}" if "design_s" in r else "— | — | — (skipped: memory) | —")
        reqs = " | ".join(
            (lambda q: f"{q['request_s'] * 1e3:.0f} ms, {q['objects']} obj, {q['mb_read']:.1f} MB")(
                next(q for q in r[pre] if q["forget"] == max(x["forget"] for x in r[pre]))) for pre in ("datamodels", "trak"))
        out.append(f"| {r['n']:,} | {r['p']:,} | {r['write_models_per_s']:.1f} | {r['write_mb_per_s']:.0f} | {fit} | {reqs} |")
    out += ["", "Growth exponents vs n (log-log least squares): "
            + ", ".join(f"{k} {v}" for k, v in exps.items() if v is not None) + ".",
            f"Objects a request reads per forget id (the larger of datamodels and TRAK, counted through a wrapping "
            f"store): **{bench['objects_per_forget_row']:g}**. A fit task's read amplification (stored bytes read over "
            f"the masks + its targets' share of the logits): **{bench['fit_read_amplification']:.2f}**.", ""]

    out += [f"## CIFAR-10 scale: n = {c['n']:,}, p = {c['p']:,}, k = {c['k']}, m = {c['m']:,}", "",
            "Stored bytes use the benchmark's measured stored/raw ratios (zstd level 3): random logits "
            f"{logit_ratio:.2f}, datamodels β rows {ratio['datamodels']:.3f}, TRAK β rows {ratio['trak']:.2f}; "
            "masks and small arrays are given raw.", "",
            "| array | shape | raw | stored (est.) | objects |", "|---|---|---|---|---|"]
    for name, shape, raw, stored, objects in array_rows(c, ratio["datamodels"], ratio["trak"], logit_ratio):
        out.append(f"| `{name}` | {shape} | {human(raw)} | {human(stored) if stored else '≈ raw or less'} | {objects:,} |")

    m, n, p, k = c["m"], c["n"], c["p"], c["k"]
    train_h_ffcv = m * FFCV_RESNET9_A100_S / 3600
    out += ["", "### The estimate: m = 50,000 subset models", "",
            f"- Training: ResNet-9 to 92.6 % takes {FFCV_RESNET9_A100_S:g} s on one A100 with FFCV ([FFCV]({SOURCES['ffcv']}), "
            f"the loader of the datamodels authors, who trained {PAPER_MODELS_ALPHA50:,} such models at α = 50 % "
            f"[{SOURCES['datamodels']}]; the datamodels paper's own per-model time was not found in the sources "
            f"searched): **{train_h_ffcv:,.0f} A100-hours** for 50,000 models at the full-data time "
            f"(an α = 0.5 subset at fixed epochs has half the steps, so by proportion, not measured, about {train_h_ffcv / 2:,.0f} h). "
            f"A faster recipe (airbench, {AIRBENCH94_A100_S} s to 94 %, [{SOURCES['airbench']}]) gives "
            f"{m * AIRBENCH94_A100_S / 3600:,.0f} h."]
    if training:
        out.append(f"- Measured here on CPU (`bench_training.py`, {training['dataset']}, {training['models']} models): "
                   f"{1 / training['sequential_models_per_s']:.3g} s per model sequential, "
                   f"{1 / training['batched_models_per_s']:.3g} s batched ({training['achieved_gflops']} GFLOP/s achieved, "
                   f"{training['matmul_peak_gflops']} GFLOP/s matmul peak). No ResNet-9 CIFAR-10 time is measured here "
                   "(no GPU, no CIFAR-10 download on the reference machine).")
    else:
        out.append(f"- Measured here on CPU, recorded in README.md (no `--training` given): digits width-256 MLP "
                   f"{DIGITS_MLP_S * 1e3:g} ms per model (`lds_vs_models.py`, batched), mnist1d cnn1d {MNIST1D_CNN_S} "
                   "CPU s per model (`mnist1d_recipe.py`). No ResNet-9 CIFAR-10 time is measured here.")
    raw_model = p * k * 4 + n
    out += [f"- Storage: {human(raw_model)} per model raw (logits p·k·4 + mask n), "
            f"**{human(m * (p * k * 4 * logit_ratio + n))} stored** for 50,000 models "
            f"(logits at the measured ratio {logit_ratio:.2f}; real logits are not N(0, 1) and may compress better).",
            f"- Writes: {big['write_mb_per_s']:.0f} MB/s measured for one writer at n = {big['n']:,} "
            f"→ {m * raw_model / (big['write_mb_per_s'] * 1e6) / 3600:.2f} writer-hours for all 50,000 models "
            "(negligible next to training; blocks write in parallel, one shard each)."]

    out += ["", "### The fit", ""]
    if iters:
        I = iters["iterations_per_regression"]
        flops = fit_flops(n, p, k, m, I, c["val"], c["holdout"])
        total = sum(flops.values())
        out += [f"FISTA iterations per regression, measured by this script on the real solver (default λ path of "
                f"{20} points, tol {iters['tol']:g}; store {iters['store']}, n = {iters['n']:,}, {iters['models']:,} models, "
                f"{iters['regressions']} regressions, {iters['seconds']:.1f} s): **I = {I:.0f}** (λ path + refit). "
                "At CIFAR-10 the problem is larger and I may differ; the FISTA term scales linearly in it.", "",
                "| term | FLOPs |", "|---|---|"]
        out += [f"| {name} | {v:.2e} |" for name, v in flops.items()]
        out += [f"| **total** | **{total:.2e}** |", "",
                f"**{total / (A100_FP32_TFLOPS * 1e12) / 3600:,.0f} A100-hours** at the FP32 peak "
                f"({A100_FP32_TFLOPS} TFLOP/s, [datasheet]({SOURCES['a100']})); "
                f"{total / (A100_TF32_TFLOPS * 1e12) / 3600:,.0f} h at the TF32 tensor-core peak "
                f"({A100_TF32_TFLOPS:g} TFLOP/s). Peaks are bounds: real GEMMs reach less."]
    else:
        out.append("FISTA iterations not measured (pass --iter-store); FLOPs per iteration: "
                   f"2·n²·p·k = {2.0 * n * n * p * k:.2e}.")
    fitting = m - c["holdout"]
    m_val = max(1, math.ceil(c["val"] * fitting))
    task = task_bytes(n, c["T"] * k, fitting - m_val, m_val)
    read = (m * n + m * c["T"] * k * 4 * logit_ratio) * (bench["fit_read_amplification"] or 1)
    out += ["", f"- One task of T = {c['T']} targets needs **{human(task)}** (`attribution.fit_memory`, of which "
            f"{human(2 * n * n * 4)} is the shared Gram pair), bounded by `dmm fit --max-task-memory`; "
            f"{math.ceil(p / c['T'])} tasks.",
            f"- It reads the masks and its targets' logits: {human(read)} at the measured amplification "
            f"{bench['fit_read_amplification'] or 1:.2f}."]

    out += ["", "### A deletion request", ""]
    for prefix in ("datamodels", "trak"):
        e = exps.get(f"{prefix}_request_s_F{top_f}") or 1.0
        for f in sorted(req[prefix]):
            q = req[prefix][f]
            lat = q["request_s"] * (p / p_b) ** e
            out.append(f"- {prefix}, |F| = {f:,}: {f * bench['objects_per_forget_row']:,.0f} objects, "
                       f"{human(f * row_bytes[prefix] * p / p_b)} read, ≈ **{lat:.2g} s** "
                       f"(measured {q['request_s'] * 1e3:.0f} ms at p = {p_b:,}, scaled by (p/{p_b:,})^{e:.2f}, "
                       "the measured exponent).")

    ni, pi, ki = IMAGENET["n"], IMAGENET["p"], IMAGENET["k"]
    out += ["", f"## ImageNet scale: n = {ni:,}, p = {pi:,} (train + validation), k = {ki:,}", "",
            "What stops working:", "",
            f"- β alone is n·p·k = **{ni * pi * ki:.1e} entries**, > 10¹³ ({human(ni * pi * ki * 4)} in float32); "
            f"one margin per target instead of k logits still leaves n·p = {ni * pi:.1e}.",
            f"- The logits of m = 50,000 subset models: {human(50_000 * pi * ki * 4)}.",
            f"- The shared Gram XᵀX: n² = {ni * ni:.1e} entries, {human(2 * ni * ni * 4)} for the pair a fit holds; "
            f"one FISTA iteration over every regression is 2·n²·p·k = {2.0 * ni * ni * pi * ki:.1e} FLOPs.",
            f"- One dense β row (what a request reads per forget id) is {human(pi * ki * 4)}.", "",
            "What the pipeline does instead:", ""]
    out += instead_at_imagenet(bench, sparse)
    return "\n".join(out)


def instead_at_imagenet(bench: dict, sparse: dict | None, subsets=(1_000, 10_000)) -> list[str]:
    """The ImageNet section's answers: TRAK with a target subset (β = n·T·k), and sparse β as measured."""
    ni, pi, ki = IMAGENET["n"], IMAGENET["p"], IMAGENET["k"]
    trak_ratio = next(r for r in bench["rows"][::-1] if r["trak"])["trak"][-1]
    trak_ratio = trak_ratio["mb_read"] * 1e6 / trak_ratio["forget"] / (bench["rows"][-1]["p"] * 10 * 4)
    out = ["- **The datamodels regression does not run here**: its shared Gram pair alone is "
           f"{human(2 * ni * ni * 4)}. **TRAK** (`dmm trak`) does: no subset models and no Gram of the masks; its "
           "cost is per-example gradients of (n + targets) × C checkpoints and a P × P kernel (P ≤ 2,048 here).",
           "- **A target subset** (`dmm trak --targets random:T:SEED` or `ids:FILE`, and the same for `dmm fit`): "
           "β, its row copy, bias and LDS hold only T targets, so every p-proportional row above shrinks by p / T, and "
           "TRAK computes target gradients for those T only. DM-Direct predicts the fitted targets; DMM matches on F ∩ T "
           "and on retain points drawn from T (a request whose F lies outside T moves F only through what it shares with "
           "R; `dmm unlearn` says how many of |F| are fitted and the ledger records it). At ImageNet, TRAK β rows dense "
           f"(the measured stored/raw ratio {trak_ratio:.2f}):", "",
           "| targets T | β entries n·T·k | β stored (+ the same again as the row copy) | one row (a request reads per forget id) "
           "| \\|F\\| = 1,000 reads |", "|---|---|---|---|---|"]
    for t in subsets:
        row = t * ki * 4
        out.append(f"| {t:,} | {ni * t * ki:.2e} | {human(ni * row * trak_ratio)} | {human(row * trak_ratio)} | "
                   f"{human(1000 * row * trak_ratio)} |")
    out += ["", f"  Against all p = {pi:,} targets: {human(ni * pi * ki * 4 * trak_ratio)} and "
            f"{human(pi * ki * 4 * trak_ratio)} a row. k = {ki:,} per-logit columns remain the largest factor; "
            "one margin per target (k = 1) would divide by k, but DMM matches all k logits, so it is not offered.", ""]
    if sparse is None:
        out.append("- **Sparse β**: not measured (pass `--sparse`, the output of `benchmarks/bench_sparse_beta.py`).")
        return out
    per = sparse["per_density"]
    synth = {k: v for k, v in per.items() if k != "store"}
    out += ["- **Sparse β, measured and not adopted** (`benchmarks/bench_sparse_beta.py`, "
            f"{sparse['rows']} rows of p·k = {sparse['entries']:,} entries per density): an L1 datamodel row stored as "
            "delta-coded indices + values (each zstd) against the dense row behind the same zstd, as `weight_rows` "
            "keeps it. Zstd already turns the runs of zeros into almost nothing, so the sparse form saves "
            f"{1 - max(v['bytes_ratio'] for v in synth.values()):.0%}–{1 - min(v['bytes_ratio'] for v in synth.values()):.0%} "
            "of the bytes and the request's Σ_{i∈F} β_i takes "
            f"{min(v['sum_time_ratio'] for v in synth.values()):.2f}–{max(v['sum_time_ratio'] for v in synth.values()):.2f}× "
            "the time:", "",
            "| rows | non-zero | dense + zstd | sparse + zstd | bytes ratio | Σ time ratio |", "|---|---|---|---|---|---|"]
    for name, v in per.items():
        label = "this store's datamodels (`--store`)" if name == "store" else "synthetic"
        out.append(f"| {label} | {v['density']:.1%} | {v['dense_mb']:.2f} MB | {v['sparse_mb']:.2f} MB | "
                   f"{v['bytes_ratio']:.2f} | {v['sum_time_ratio']:.2f} |")
    out += ["", "  Neither changes the scale of anything above, so β stays dense behind zstd: one codec chain, read by "
            "Zarr itself. TRAK's β has no zeros; the sparse form does not apply to it.", ""]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="output of benchmarks/bench_scale.py (its last JSON line is read)")
    parser.add_argument("--training", help="output of benchmarks/bench_training.py (optional)")
    parser.add_argument("--iter-store", help="a store with subset models: FISTA iterations are measured on it")
    parser.add_argument("--iter-targets", type=int, default=8, help="targets of --iter-store solved")
    parser.add_argument("--sparse", help="output of benchmarks/bench_sparse_beta.py (optional)")
    args = parser.parse_args()
    bench = last_json(args.bench)
    training = last_json(args.training) if args.training else None
    iters = measure_iterations(args.iter_store, args.iter_targets) if args.iter_store else None
    print(render(bench, training, iters, last_json(args.sparse) if args.sparse else None))


if __name__ == "__main__":
    main()
