"""The one training loop of the gradient-based baselines, over a stack of N models.

A method is a plan: a list of steps, each a signed sum of loss terms on minibatches of training ids
(one (N, b) index tensor per term: model n uses row n), optionally plus an ℓ1 penalty. `descend`
takes the steps with SGD (`attribution.stacked_optimizer.StackedOptimizer`, i.e. `torch.optim.SGD` on stacked
tensors) on a copy of the stack, with the gradients of `ModelStack.gradient_function` (backpropagated by
hand through a linear chain, as the engine trains). Parameters outside `trainable` never move; a partly
trainable tensor's frozen entries are put back after every step, so weight decay and momentum cannot move them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from attribution.engine import epoch_permutations
from attribution.stacked_optimizer import StackedOptimizer
from attribution.recipes import Recipe

from .config import SGDConfig
from .stack import ModelStack, StackedResult, StackedTask, stacked_cross_entropy


@dataclass(frozen=True)
class CE:
    """weight · mean_j CE(f(x_j), labels_j) per model; labels (N, b). weight −1 is gradient ascent."""
    idx: torch.Tensor
    labels: torch.Tensor
    weight: float = 1.0

    def to(self, device) -> "CE":
        return replace(self, idx=self.idx.to(device), labels=self.labels.to(device))

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        return self.weight * stacked_cross_entropy(logits, self.labels).mean(1)


@dataclass(frozen=True)
class KL:
    """weight · T² · mean_j KL(softmax(t_j/T) ‖ softmax(f(x_j)/T)) per model: the distillation loss
    to a teacher's logits t (N, b, k) at temperature T (Hinton et al.; SCRUB's `DistillKL`)."""
    idx: torch.Tensor
    teacher: torch.Tensor
    weight: float = 1.0
    temperature: float = 1.0

    def to(self, device) -> "KL":
        return replace(self, idx=self.idx.to(device), teacher=self.teacher.to(device))

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        kl = F.kl_div(torch.log_softmax(logits / t, -1), torch.log_softmax(self.teacher / t, -1),
                      reduction="none", log_target=True).sum(-1)
        return self.weight * t * t * kl.mean(1)


@dataclass(frozen=True)
class Step:
    """One optimiser step: Σ of its terms, plus l1 · ‖θ‖₁ over the trainable parameters."""
    terms: tuple
    l1: float = 0.0

    def inputs(self) -> list[torch.Tensor]:
        """The distinct minibatches (N, b) of its terms (terms on the same ids share one forward pass)."""
        return list({id(t.idx): t.idx for t in self.terms}.values())


FORGET, RETAIN, LABELS, INIT = 1, 2, 3, 4  # the random streams of a model's seed


def order_seed(seed: int, stream: int) -> int:
    """The seed of one random stream (forget order, retain order, labels, …) of the model with `seed`."""
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1)[0])


def epoch_batches(ids: np.ndarray, epochs: int, batch_size: int, seeds, stream: int) -> list[list[torch.Tensor]]:
    """Per epoch, the minibatches (N, b) of `ids`: model n visits them in its own order each epoch."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    orders = torch.stack([torch.stack(epoch_permutations(ids, epochs, order_seed(s, stream))) for s in seeds])
    return [list(orders[:, e].split(batch_size, dim=1)) for e in range(epochs)]


def cycled_batches(ids: np.ndarray, n_steps: int, batch_size: int, seeds, stream: int) -> list[torch.Tensor]:
    """`n_steps` minibatches (N, b) of `ids`, epoch after epoch (a fresh order each), for pairing a
    second data stream with a first one's steps."""
    per_epoch = -(-len(ids) // batch_size)
    epochs = epoch_batches(ids, -(-n_steps // per_epoch), batch_size, seeds, stream)
    return [b for epoch in epochs for b in epoch][:n_steps]


def sample_grads(steps: list[Step]) -> int:
    """Per-sample gradient evaluations per model: Σ over steps and terms of the minibatch size."""
    return sum(idx.shape[1] for s in steps for idx in s.inputs())


def step_loss(step: Step, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The step's loss Σ_n Σ_terms as a function of the logits (N, b, k) of its inputs concatenated along b."""
    inputs, terms = step.inputs(), [t.to(device) for t in step.terms]
    part = {id(i): n for n, i in enumerate(inputs)}

    def loss(logits: torch.Tensor) -> torch.Tensor:
        parts = logits.split([i.shape[1] for i in inputs], dim=1)
        return sum(t.loss(parts[part[id(s.idx)]]).sum() for t, s in zip(terms, step.terms))
    return loss


def descend(stack: ModelStack, x: torch.Tensor, steps: list[Step], config: SGDConfig,
            trainable: dict[str, torch.Tensor | None] | None = None) -> ModelStack:
    """Take `steps` with SGD on a copy of `stack` (inputs x: all training points); returns the copy.

    `trainable` maps a parameter name to None (it all trains) or a boolean mask (N, …) of its entries
    that train; parameters it leaves out are frozen (and their modules kept in eval mode, so that no
    BatchNorm statistic of a frozen block moves). Default: every parameter trains.
    """
    out = stack.copy()
    trainable = {k: None for k in out.params} if trainable is None else trainable
    names = [k for k in out.params if k in trainable]
    tensors = [out.params[k] for k in names]
    masks = {i: trainable[k].to(out.device) for i, k in enumerate(names) if trainable[k] is not None}
    anchors = {i: tensors[i].clone() for i in masks}
    recipe = Recipe(optimizer="sgd", lr=config.lr, momentum=config.momentum, nesterov=False,
                    weight_decay=config.weight_decay, schedule="constant", epochs=config.epochs)
    opt = StackedOptimizer(tensors, recipe)
    lr = torch.full((out.size,), config.lr, device=out.device)
    active = torch.ones(out.size, dtype=torch.bool, device=out.device)
    _set_modes(out, set(names))
    gradients = out.gradient_function(names)
    x = x.to(out.device)
    for step in steps:
        idx = torch.cat(step.inputs(), dim=1).to(out.device)
        grads = gradients(x.index_select(0, idx.flatten()).view(*idx.shape, *x.shape[1:]), step_loss(step, out.device))
        with torch.no_grad():
            if step.l1:  # ∂(l1 · ‖θ‖₁) = l1 · sign(θ)
                torch._foreach_add_(grads, torch._foreach_sign(tensors), alpha=step.l1)
            opt.step(grads, lr, active)
            for i, mask in masks.items():
                torch.where(mask, tensors[i], anchors[i], out=tensors[i])
    for k in names:
        out.params[k] = out.params[k].detach()
    out.base.eval()
    return out


def run(task: StackedTask, steps: list[Step], trainable=None, extra_grads: int = 0) -> StackedResult:
    """Descend `steps` from the task's models; the result with its steps and per-sample gradients
    (`extra_grads` more per model, e.g. a saliency mask's)."""
    stack = descend(task.stack, task.data.x_train, steps, task.config, trainable)
    return StackedResult(stack, {"steps": len(steps), "sample_grads": sample_grads(steps) + extra_grads})


def _set_modes(stack: ModelStack, trainable: set[str]) -> None:
    """Training mode for the base, eval mode for every module none of whose own parameters train."""
    stack.base.train()
    for prefix, module in stack.base.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
        if own and not trainable.intersection(own):
            module.eval()
