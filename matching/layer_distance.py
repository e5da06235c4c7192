"""How far a method moved the weights: relative L2 distance from the original, per tensor and in all.

d(name) = ‖a[name] − b[name]‖₂ / ‖b[name]‖₂ over each floating-point tensor of the state dicts
(b = the original θ0); "total" = ‖a − b‖₂ / ‖b‖₂ over all of them concatenated. Integer buffers
(BatchNorm's step counter) are skipped. 0/0 = 0; a move away from an all-zero tensor is inf.
"""
from __future__ import annotations

import math

import torch

from .errors import MatchingError

TOTAL = "total"


def _ratio(num_sq: float, den_sq: float) -> float:
    if den_sq == 0:
        return 0.0 if num_sq == 0 else math.inf
    return math.sqrt(num_sq / den_sq)


def layer_distances(state_a: dict, state_b: dict) -> dict[str, float]:
    """{tensor name: ‖a − b‖ / ‖b‖} for every floating-point tensor, plus "total"; b is the original."""
    if state_a.keys() != state_b.keys():
        diff = sorted(set(state_a) ^ set(state_b))
        raise MatchingError(f"the two state dicts name different tensors ({', '.join(diff[:5])}); "
                            "compare two models of the same architecture")
    if TOTAL in state_b:
        raise MatchingError(f"a tensor is named {TOTAL!r}, the key of the overall distance; rename it")
    out, num_all, den_all = {}, 0.0, 0.0
    for name, b in state_b.items():
        a, b = torch.as_tensor(state_a[name]), torch.as_tensor(b)
        if a.shape != b.shape:
            raise MatchingError(f"tensor {name} has shape {tuple(a.shape)} vs {tuple(b.shape)}; "
                                "compare two models of the same architecture")
        if not b.is_floating_point():
            continue
        num = float((a.double() - b.double()).square().sum())
        den = float(b.double().square().sum())
        out[name] = _ratio(num, den)
        num_all, den_all = num_all + num, den_all + den
    out[TOTAL] = _ratio(num_all, den_all)
    return out
