"""Projective Residual Update, PRU (Izzo, Smart, Chaudhuri & Zou, AISTATS 2021, "Approximate data deletion
from machine learning models"), for the `linear` softmax-regression model only.

PRU (their Algorithm 1) is for a ridge regression θ = A⁻¹ Xᵀ T, A = XᵀX + λI, on features x (rows of X,
n × d) and targets T (n × k). To delete K = F it
1. computes the leave-K-out predictions on K from the hat matrix H = X A⁻¹ Xᵀ, without the LKO model:
       ŷ'_K = (I − H_KK)⁻¹ (ŷ_K − H_KK T_K),   ŷ_K = X_K θ;
2. projects the exact update onto span{x_i : i ∈ K}: the step that makes the predictions on K equal ŷ'_K,
       θ_PRU = θ − S⁺ Σ_{i∈K} x_i (θᵀx_i − ŷ'_i)ᵀ,   S = Σ_{i∈K} x_i x_iᵀ,
   computed as θ − X_Kᵀ (X_K X_Kᵀ)⁺ (X_K θ − ŷ'_K) (the same vector; O(|K|² d) as the paper's).
PRU equals the exact leave-K-out ridge solution when that update lies in span{x_K}, e.g. when no retained
point shares a feature with a forgotten one.

Our model: logits z = W x + b trained with CE (label smoothing ε) and coupled weight decay w on every
parameter. With x̃ = [x, 1] and θ = [W b]ᵀ ((d+1) × k), its optimum satisfies X̃ᵀ(P − Y) + λθ = 0 with
λ = n·w, P = softmax(Z), Y the (smoothed) one-hot labels, i.e. θ0 is exactly the ridge solution for the
working targets T = Z + Y − P (one unit-weight IRLS step at θ0). PRU is applied to that ridge problem,
targets fixed at θ0: exact for the ridge problem, an approximation for the CE model (as any IRLS step).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from attribution.grouped_mlp import linear_chain

from ..errors import MatchingError
from ..methods import UnlearnTask, Unlearned, register_method
from .config import hp, require
from .registry import stacked_task


@dataclass(frozen=True)
class PRUConfig:
    """PRU has no step size: only the L2 and label smoothing the linear model was trained with (its
    recipe's by default), which define the ridge problem θ0 solves."""
    weight_decay: float = hp(-1.0, "weight decay w the model was trained with (ridge λ = |S|·w); -1: its recipe's")
    label_smoothing: float = hp(-1.0, "label smoothing the model was trained with; -1: its recipe's")
    seed: int = hp(0, "unused: PRU draws nothing at random (every method takes a seed)")

    def __post_init__(self):
        require(self.weight_decay >= 0 or self.weight_decay == -1,
                f"weight_decay {self.weight_decay} must be >= 0, or -1 for the recipe's; e.g. --set weight_decay=5e-4")
        require(0 <= self.label_smoothing < 1 or self.label_smoothing == -1,
                f"label_smoothing {self.label_smoothing} must lie in [0, 1), or -1 for the recipe's")

    def to_dict(self) -> dict:
        return asdict(self)


def leave_out_predictions(x: torch.Tensor, targets: torch.Tensor, theta: torch.Tensor, lam: float,
                          forget: np.ndarray) -> torch.Tensor:
    """ŷ'_K (|K| × k): the predictions on K of the ridge regression fitted without K (hat-matrix formula)."""
    xk = x[forget]
    a = x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype)
    h = xk @ torch.linalg.solve(a, xk.T)  # H_KK
    eye = torch.eye(len(forget), dtype=x.dtype)
    return torch.linalg.solve(eye - h, xk @ theta - h @ targets[forget])


def projective_residual_update(x: torch.Tensor, targets: torch.Tensor, theta: torch.Tensor, lam: float,
                               forget: np.ndarray) -> torch.Tensor:
    """θ_PRU (d × k) for the ridge regression θ (d × k) of `targets` on features x (n × d) with penalty λ."""
    xk = x[forget]
    residual = xk @ theta - leave_out_predictions(x, targets, theta, lam, forget)
    return theta - xk.T @ (torch.linalg.pinv(xk @ xk.T, hermitian=True) @ residual)


def working_targets(z: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """T = Z + Y − softmax(Z): the targets whose ridge regression a CE + L2 optimum θ0 is (Y smoothed by ε)."""
    k = z.shape[1]
    onehot = (1 - smoothing) * F.one_hot(y, k).to(z.dtype) + smoothing / k
    return z + onehot - torch.softmax(z, dim=1)


def training_l2(task: UnlearnTask) -> tuple[float, float]:
    """(weight decay, label smoothing) the model was trained with: the config's, else its recipe's."""
    c = task.config
    recipe = stacked_task(task).recipe
    if recipe is None and -1 in (c.weight_decay, c.label_smoothing):
        raise MatchingError("pru needs the weight decay and label smoothing the model was trained with; pass "
                            "--set weight_decay=W --set label_smoothing=E, or a model whose sidecar names its recipe")
    return (c.weight_decay if c.weight_decay != -1 else recipe.weight_decay,
            c.label_smoothing if c.label_smoothing != -1 else recipe.label_smoothing)


@register_method("pru", PRUConfig)
def pru(task: UnlearnTask) -> Unlearned:
    """PRU: project the leave-F-out ridge update onto span{x_F} (linear models only)."""
    layers = linear_chain(task.model)
    if layers is None or len(layers) != 1:
        raise MatchingError("pru is for linear models only; train a `linear` model (--model linear --recipe ...)")
    weight_decay, smoothing = training_l2(task)
    layer = task.model.get_submodule(layers[0])
    x = task.data.x_train.flatten(1).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # x̃ = [x, 1]
    theta = torch.cat([layer.weight.detach().T, layer.bias.detach().unsqueeze(0)]).double().cpu()
    targets = working_targets(x @ theta, task.data.y_train, smoothing)
    new = projective_residual_update(x, targets, theta, task.data.n_train * weight_decay, task.forget_ids)
    model = copy.deepcopy(task.model)
    out = model.get_submodule(layers[0])
    with torch.no_grad():
        out.weight.copy_(new[:-1].T)
        out.bias.copy_(new[-1])
    return Unlearned(model.eval(), {"steps": 0, "sample_grads": 0})
