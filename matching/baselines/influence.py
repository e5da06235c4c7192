"""Influence unlearning, IU (Koh & Liang 2017; the WoodFisher IU baseline of Jia et al., NeurIPS 2023).

Removing F from the empirical risk L(θ) = (1/n) Σ_{i∈S} ℓ_i(θ) (n = |S|) moves its minimiser, to first
order, by one Newton step (the influence function at ε = −1/n):
    θ_u = θ0 + H⁻¹ v,   v = (1/n) Σ_{i∈F} ∇ℓ_i(θ0).
The Hessian is approximated as WoodFisher does (Singh & Alistarh, NeurIPS 2020): the empirical Fisher of
m points M ⊆ S (drawn per model from its seed), damped by λ,
    H ≈ λ I + (1/m) Σ_{j∈M} g_j g_jᵀ = λ I + GᵀG / m,   g_j = ∇ℓ_j(θ0),  G: m × P.
WoodFisher inverts it with m Sherman–Morrison rank-one updates from λ I; their closed form (Woodbury)
    H⁻¹ v = (v − Gᵀ (mλ I + G Gᵀ)⁻¹ G v) / λ
is what is computed, exactly (an m × m Cholesky solve); G is never P × P: factored for a linear chain, else held
in chunks (`per_sample.gradients`). All of it is
in float64: the step is v / λ in the directions the Fisher misses, which amplifies rounding by 1/λ.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import hp, require
from .loop import order_seed
from .per_sample import block_floats, flatten, gradients, shared_points, unflatten
from .registry import register_stacked
from .stack import ModelStack, StackedResult, StackedTask

FISHER_STREAM = 8  # the random stream of a model's seed that draws M (loop.py's streams are 1-4, retrain's 7)
GRAM_FLOATS = 2 ** 20  # a group's m × m Gram matrices on a CPU: one model's at m = 1,000 (groups of 4 took 30 %
                       # longer there); `block_floats` scales it on a GPU


@dataclass(frozen=True)
class IUConfig:
    """Defaults: m = 1,000 Fisher gradients as Jia et al.'s WoodFisher IU; λ = 1e-3 keeps the step finite in
    the directions the Fisher of a well-fit model barely sees (the step there is v / λ)."""
    damping: float = hp(1e-3, "λ: H ≈ λ I + empirical Fisher; smaller is a larger, less damped step")
    fisher_samples: int = hp(1000, "m: points of S whose gradients form the Fisher (0 or > |S|: all of S)")
    seed: int = hp(0, "draws the Fisher points M from S")

    def __post_init__(self):
        require(self.damping > 0, f"damping {self.damping} must be > 0; e.g. --set damping=1e-3")
        require(self.fisher_samples >= 0, f"fisher_samples {self.fisher_samples} must be >= 0; 0 takes all of S")

    def to_dict(self) -> dict:
        return {"damping": self.damping, "fisher_samples": self.fisher_samples, "seed": self.seed}


def fisher_points(n_train: int, m: int, seeds) -> torch.Tensor:
    """M (N, m): all of S in order when m is 0 or ≥ n, else m points drawn without replacement per model."""
    if m == 0 or m >= n_train:
        return shared_points(np.arange(n_train), len(seeds))
    rows = [np.sort(np.random.default_rng(order_seed(s, FISHER_STREAM)).choice(n_train, m, replace=False))
            for s in seeds]
    return torch.as_tensor(np.stack(rows), dtype=torch.long)


def in_float64(stack: ModelStack) -> ModelStack:
    """A float64 copy of the stack's floating-point tensors."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.double() if t.is_floating_point() else t
    return ModelStack(stack.base, {k: cast(v) for k, v in stack.params.items()},
                      {k: cast(v) for k, v in stack.buffers.items()})


def forget_gradient(stack: ModelStack, x: torch.Tensor, y: torch.Tensor, forget_ids: np.ndarray) -> torch.Tensor:
    """v (N, P) = (1/n) Σ_{i∈F} ∇ℓ_i(θ0) over the n training points x, in eval mode."""
    points = shared_points(forget_ids, stack.size)
    ones = torch.ones(points.shape, dtype=x.dtype, device=stack.device)
    return gradients(stack, x, y, points).transpose_times(ones) / len(x)


def inverse_fisher_product(g, v: torch.Tensor, damping: float) -> torch.Tensor:
    """(λ I + GᵀG/m)⁻¹ v (N, P) for the per-sample gradients G (m × P per model, `per_sample.gradients`),
    by Woodbury: (v − Gᵀ (mλ I + G Gᵀ)⁻¹ G v) / λ."""
    system = g.gram()  # + mλ I: symmetric positive definite, solved by Cholesky
    system.diagonal(dim1=1, dim2=2).add_(system.shape[1] * damping)
    coef = torch.cholesky_solve(g.times(v).unsqueeze(2), torch.linalg.cholesky(system)).squeeze(2)
    return (v - g.transpose_times(coef)) / damping


def model_groups(n_models: int, m: int, device) -> list[slice]:
    """Slices of the model axis whose m × m Gram matrices (float64) fit in `block_floats(GRAM_FLOATS)`
    together: on a CPU the solve's work is per model, and a stack of large Gram matrices is slower than a
    few at a time."""
    step = max(1, block_floats(GRAM_FLOATS, device) // (m * m))
    return [slice(s, s + step) for s in range(0, n_models, step)]


def newton_step(stack: ModelStack, x: torch.Tensor, y: torch.Tensor, forget_ids: np.ndarray, points: torch.Tensor,
                damping: float) -> tuple[torch.Tensor, int]:
    """H⁻¹ v (N, P) in float64 for the models of `stack`, and the per-sample gradients taken per model."""
    grads = gradients(stack, x, y, points)
    return inverse_fisher_product(grads, forget_gradient(stack, x, y, forget_ids), damping), grads.computed


@register_stacked("iu", IUConfig)
def influence_unlearning(task: StackedTask) -> StackedResult:
    """IU: one Newton step θ0 + H⁻¹ (1/n) Σ_F ∇ℓ_i, H the λ-damped empirical (Wood)Fisher of S."""
    c = task.config
    stack, x, y = in_float64(task.stack), task.data.x_train.double(), task.data.y_train  # 1/λ amplifies rounding
    points = fisher_points(task.data.n_train, c.fisher_samples, task.seeds)
    steps = [newton_step(ModelStack(stack.base, {k: v[g] for k, v in stack.params.items()},
                                    {k: v[g] for k, v in stack.buffers.items()}), x, y, task.forget_ids, points[g],
                         c.damping) for g in model_groups(stack.size, points.shape[1], stack.device)]
    theta = flatten(task.stack.params)
    theta = theta + torch.cat([step for step, _ in steps]).to(theta.dtype)
    out = ModelStack(task.stack.base, unflatten(task.stack, theta), dict(task.stack.buffers))
    return StackedResult(out, {"steps": 1, "sample_grads": len(task.forget_ids) + steps[0][1]})
