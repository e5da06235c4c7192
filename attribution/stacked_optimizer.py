"""SGD (momentum, Nesterov) and Adam over B stacked models: `torch.optim`'s update rules on (B, ...) tensors
with a per-model learning rate, used by the training engine and the baselines' stacked loop."""
from __future__ import annotations

import torch

from .recipes import Recipe


class StackedOptimizer:
    """SGD (momentum, Nesterov) and Adam on (B, ...) stacked parameters, matching `torch.optim`.

    Weight decay is coupled (added to the gradient), as in `torch.optim.SGD/Adam`. A model that is
    inactive at a step (its epoch has fewer batches) keeps its parameters and optimiser state.
    """

    def __init__(self, params: list[torch.Tensor], recipe: Recipe):
        self.params, self.recipe = params, recipe
        self.buf = [torch.zeros_like(p) for p in params]
        self.sq = [torch.zeros_like(p) for p in params] if recipe.optimizer == "adam" else None
        self.steps = torch.zeros(params[0].shape[0], dtype=torch.float64, device=params[0].device)

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], lr: torch.Tensor, active: torch.Tensor) -> None:
        """Apply the step with per-model learning rates lr (B,); `grads` may be overwritten."""
        r, params = self.recipe, self.params
        self.steps += active
        state = params + self.buf + (self.sq or [])
        saved = None if bool(active.all()) else [t.clone() for t in state]
        neg_lr = [self._per_model(-lr, p) for p in params]
        if r.weight_decay:
            torch._foreach_add_(grads, params, alpha=r.weight_decay)
        if r.optimizer == "sgd":
            if r.momentum > 0:
                torch._foreach_mul_(self.buf, r.momentum)
                torch._foreach_add_(self.buf, grads)
                if r.nesterov:
                    torch._foreach_add_(grads, self.buf, alpha=r.momentum)
                else:
                    grads = self.buf
            torch._foreach_addcmul_(params, grads, neg_lr)
        else:
            b1, b2 = r.betas
            t = self.steps.clamp(min=1)
            torch._foreach_lerp_(self.buf, grads, 1 - b1)
            torch._foreach_mul_(self.sq, b2)
            torch._foreach_addcmul_(self.sq, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(self.sq)
            torch._foreach_div_(denom, [self._per_model((1 - b2 ** t).sqrt(), p) for p in params])
            torch._foreach_add_(denom, r.eps)
            update = torch._foreach_div(self.buf, denom)
            torch._foreach_mul_(update, [self._per_model(-lr / (1 - b1 ** t), p) for p in params])
            torch._foreach_add_(params, update)
        if saved is not None:  # models without a batch at this step keep parameters and state
            for current, old in zip(state, saved):
                current.copy_(torch.where(self._per_model(active, current), current, old))

    @staticmethod
    def _per_model(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A (B,) per-model vector shaped to broadcast over a stacked (B, ...) tensor."""
        v = v.view((-1,) + (1,) * (like.dim() - 1))
        return v if v.dtype == torch.bool else v.to(like.dtype)
