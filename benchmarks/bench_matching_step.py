"""One matching step of cnn1d's default head (its last two blocks): written out vs autograd, in one process.

The head [MatmulConv1d, ReLU, Flatten, Linear] trains on the frozen trunk's outputs for |F ∪ R| = 150 points of
mnist1d's shape (40 values, 10 classes), minibatches of 64, Adam as the matching runs it. Two sides, each from the
same initial head and the same minibatch order, alternated over --repeats rounds of --steps steps:
- autograd: MSE of the head on the trunk's outputs, `backward()`, Adam (the matching before `matching.windowed_head`);
- written out: the windows of the trunk's outputs computed once, `windowed_head_gradient`, Adam (the matching now).
Both end with the same parameters (checked: the largest difference is printed; 0 on this project's CPU).

Run: python benchmarks/bench_matching_step.py [--steps 500] [--repeats 5] [--threads 1]
Prints a summary, then one JSON line last (ratio = autograd's step time / the written-out one's, medians).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from attribution.models import build_model
from matching.finetune import autograd_gradient, frozen_trunk, trunk_outputs
from matching.windowed_head import precomputed_windows, windowed_head_gradient

POINTS, BATCH = 150, 64


def run(head, inputs, targets, gradient, steps: int) -> float:
    """Seconds per Adam step of `head` (in place) over `steps` minibatches of (inputs, targets) in a fixed order,
    `gradient(x, T)` setting the head's .grad."""
    opt = torch.optim.Adam(head.parameters(), lr=5e-3, fused=True)
    order = torch.Generator().manual_seed(0)
    batches = [idx for _ in range(-(-steps * BATCH // POINTS)) for idx in torch.randperm(POINTS, generator=order).split(BATCH)]
    start = time.perf_counter()
    for idx in batches[:steps]:
        gradient(inputs[idx], targets[idx])
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model("cnn1d", (40,), 10, seed=0)
    x = torch.randn(POINTS, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        targets = model(x) + 0.3 * torch.randn(POINTS, 10, generator=torch.Generator().manual_seed(2))
    trunk, head = frozen_trunk(model, 2)
    features = trunk_outputs(trunk, x)
    times = {"autograd": [], "written_out": []}
    for _ in range(args.repeats + 1):  # the first round warms both up and is not counted
        plain = copy.deepcopy(head)
        times["autograd"].append(run(plain, features, targets, autograd_gradient(plain), args.steps))
        windowed, windows = precomputed_windows(copy.deepcopy(head), features)
        times["written_out"].append(run(windowed, windows, targets, windowed_head_gradient(windowed), args.steps))
    diff = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), windowed.parameters()))
    ms = {side: statistics.median(t[1:]) * 1e3 for side, t in times.items()}
    ratio = ms["autograd"] / ms["written_out"]
    print(f"a step of cnn1d's last two blocks on {BATCH} points, {args.threads} thread(s): autograd "
          f"{ms['autograd']:.3f} ms, written out {ms['written_out']:.3f} ms, ratio {ratio:.2f}; "
          f"parameters after {args.steps} steps differ by at most {diff:.2e}")
    print(json.dumps({"bench": "matching_step", "autograd_ms": round(ms["autograd"], 4),
                      "written_out_ms": round(ms["written_out"], 4), "ratio": round(ratio, 3), "max_param_diff": diff}))


if __name__ == "__main__":
    main()
