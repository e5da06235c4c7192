"""Selective Synaptic Dampening (Foster, Schoepf & Brintrup, AAAI 2024, "Fast machine unlearning
without retraining through selective synaptic dampening").

No training: the importance of parameter θ_i on data D is the diagonal of the (empirical) Fisher,
    []_D,i = (1/|D|) Σ_{j∈D} (∂ℓ_j/∂θ_i)²,   ℓ_j = CE(f_θ0(x_j), y_j),
taken on the forget set D_f = F and on the full training data D = S (F included, as the paper).
Every parameter that is specialised to F, []_Df,i > α·[]_D,i, is dampened,
    θ_i ← β·θ_i,   β = min(λ·[]_D,i / []_Df,i, 1);
every other parameter is left exactly as it was. The importances are per-point squared gradients (the
paper's expectation); the authors' code squares minibatch-mean gradients instead.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .config import hp, require
from .per_sample import flatten, squares, unflatten
from .registry import register_stacked
from .stack import ModelStack, StackedResult, StackedTask


@dataclass(frozen=True)
class SSDConfig:
    """Defaults: α = 10 (selection) and λ = 1 (dampening) as the paper's ResNet-18 / ViT experiments."""
    alpha: float = hp(10.0, "α: dampen θ_i where its F-importance exceeds α × its S-importance")
    dampening: float = hp(1.0, "λ: dampened θ_i is scaled by min(λ · I_S,i / I_F,i, 1)")
    seed: int = hp(0, "unused: SSD draws nothing at random (every method takes a seed)")

    def __post_init__(self):
        require(self.alpha > 0, f"alpha {self.alpha} must be > 0; e.g. --set alpha=10")
        require(self.dampening > 0, f"dampening {self.dampening} must be > 0; e.g. --set dampening=1")

    def to_dict(self) -> dict:
        return asdict(self)


def diagonal_fisher(stack: ModelStack, x: torch.Tensor, y: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
    """[]_D (N, P): the mean over the points `ids` of the squared per-point gradients of CE."""
    return squares(stack, x, y, ids) / len(ids)


def dampen(theta: torch.Tensor, forget: torch.Tensor, full: torch.Tensor, alpha: float, lam: float) -> torch.Tensor:
    """SSD's update of flat parameters θ (N, P) given []_Df and []_D: selected θ_i scaled by β, others kept."""
    selected = forget > alpha * full
    beta = torch.clamp(lam * full / torch.where(selected, forget, torch.ones_like(forget)), max=1.0)
    return torch.where(selected, beta * theta, theta)


@register_stacked("ssd", SSDConfig)
def ssd(task: StackedTask) -> StackedResult:
    """SSD: scale θ_i by min(λ·I_S/I_F, 1) where the diagonal Fisher on F exceeds α × that on S."""
    c, x, y = task.config, task.data.x_train, task.data.y_train
    forget = diagonal_fisher(task.stack, x, y, task.forget_ids)
    full = diagonal_fisher(task.stack, x, y, np.arange(task.data.n_train))
    theta = dampen(flatten(task.stack.params), forget, full, c.alpha, c.dampening)
    out = ModelStack(task.stack.base, unflatten(task.stack, theta), dict(task.stack.buffers))
    return StackedResult(out, {"steps": 0, "sample_grads": len(task.forget_ids) + task.data.n_train})
