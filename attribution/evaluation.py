"""Model outputs f_x(θ) on every point: logits, margins, accuracy per index set."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def model_logits(model: nn.Module, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """float32 logits (N, k) of `model` in eval mode on inputs x."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(xb.to(device)).float().cpu() for xb in x.split(chunk)])


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Margin of x: logit_y(x) − logsumexp over the other classes (…, N, k) → (…, N)."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels).to(logits.device).expand(logits.shape[:-1])
    correct = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.unsqueeze(-1), float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, indices=None) -> float:
    """Fraction of points (optionally restricted to `indices`) whose arg-max logit is the label."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if indices is not None:
        idx = torch.as_tensor(indices, dtype=torch.long)
        logits, labels = logits[..., idx, :], labels[idx]
    return (logits.argmax(-1) == labels).float().mean().item()
