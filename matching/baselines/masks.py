"""Which weights a localised method may move: a `trainable` map for `loop.descend` (name → None for the
whole tensor, or a boolean mask (N, …) of its entries; parameters left out are frozen)."""
from __future__ import annotations

import torch

from attribution.models import parameter_blocks

from ..errors import MatchingError
from .stack import ModelStack, stacked_cross_entropy


def forget_gradients(stack: ModelStack, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """∇_θ Σ_{i∈F} ℓ_CE(θ0; x_i, y_i) of every model (name → (N, …)); x, y: F's inputs and labels.
    Taken in eval mode, as SalUn's `generate_mask` and DEL's localisation."""
    stack.base.eval()
    params = {k: v.detach().requires_grad_(True) for k, v in stack.params.items()}
    logits = ModelStack(stack.base, params, stack.buffers).forward(x.expand(stack.size, *x.shape))
    ce = stacked_cross_entropy(logits, y.expand(stack.size, -1))
    return dict(zip(params, torch.autograd.grad(ce.sum(), list(params.values()))))


def saliency_mask(stack: ModelStack, x: torch.Tensor, y: torch.Tensor, fraction: float) -> dict[str, torch.Tensor]:
    """SalUn's weight saliency (Fan et al., ICLR 2024, eq. 6): m = 1[|∇_θ ℓ_CE(θ0; F)| ≥ γ] with γ the
    threshold that keeps the top `fraction` of all weights of each model (DEL's SalLoc at its budget).
    x, y: F's inputs and labels."""
    grads = forget_gradients(stack, x, y)
    saliency = torch.cat([g.abs().flatten(1) for g in grads.values()], dim=1)
    keep = torch.zeros_like(saliency, dtype=torch.bool)
    keep.scatter_(1, saliency.topk(round(fraction * saliency.shape[1]), dim=1).indices, True)
    sizes = [g[0].numel() for g in grads.values()]
    return {k: m.view_as(g) for (k, g), m in zip(grads.items(), keep.split(sizes, dim=1))}


def blocks(stack: ModelStack) -> list[list[str]]:
    """Parameter names per block, input to output: a block is a top-level child module holding parameters."""
    names = list(stack.params)
    return [[n for n in names if n.startswith(f"{c}.")] for c in parameter_blocks(stack.base)] or [names]


def last_blocks(stack: ModelStack, k: int) -> list[str]:
    """Parameter names of the last k blocks; a one-line error when the model has fewer."""
    found = blocks(stack)
    if not 1 <= k <= len(found):
        raise MatchingError(f"k = {k} but the model has {len(found)} blocks (top-level modules with parameters); "
                            f"use --set k=1..{len(found)}")
    return [n for block in found[-k:] for n in block]
