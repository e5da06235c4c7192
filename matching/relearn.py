"""Relearn time: how many fine-tuning steps on F bring an unlearned model's forget accuracy back.

A copy of the model is trained with Adam on the cross-entropy over F (minibatches drawn from a
seeded reshuffle of F every pass); after every step its accuracy on all of F is measured. The
answer is the first step t at which acc_F(θ_t) ≥ the target (the original model's forget accuracy):
0 when the model already meets it, max_steps + 1 when it never does within max_steps.
Few steps mean the forgotten information was still there to be recovered.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from attribution.evaluation import model_logits

from .errors import MatchingError


def relearn_steps(model: nn.Module, x_forget: torch.Tensor, y_forget: torch.Tensor, target_accuracy: float,
                  lr: float = 1e-3, batch_size: int = 32, max_steps: int = 1000, seed: int = 0) -> int:
    """Adam steps on CE over F until accuracy on F ≥ target_accuracy (max_steps + 1 if never); `model` is untouched."""
    x_forget, y_forget = torch.as_tensor(x_forget), torch.as_tensor(y_forget, dtype=torch.long)
    if len(x_forget) == 0 or len(x_forget) != len(y_forget):
        raise MatchingError(f"relearning needs F's inputs and labels, one label per input, got {len(x_forget)} "
                            f"inputs and {len(y_forget)} labels")
    if not 0 <= target_accuracy <= 1 or not lr > 0 or batch_size < 1 or max_steps < 1:
        raise MatchingError(f"need 0 <= target accuracy <= 1, lr > 0, batch size >= 1 and max steps >= 1, got "
                            f"{target_accuracy}, {lr}, {batch_size}, {max_steps}; e.g. lr 1e-3, batch 32, 1000 steps")
    needed = math.ceil(target_accuracy * len(y_forget) - 1e-6)  # correct points; slack for a float32 target
    learner = copy.deepcopy(model)
    device = next(learner.parameters()).device
    opt = torch.optim.Adam(learner.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []

    def relearned() -> bool:
        return int((model_logits(learner, x_forget).argmax(-1) == y_forget).sum()) >= needed

    for step in range(max_steps):
        if relearned():
            return step
        if not batches:
            batches = list(torch.randperm(len(x_forget), generator=order).split(batch_size))
        idx = batches.pop(0)
        learner.train()
        loss = F.cross_entropy(learner(x_forget[idx].to(device)), y_forget[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return max_steps if relearned() else max_steps + 1
