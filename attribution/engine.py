"""Training engine: A(S') for one model, and for B models at once.

`train_model` is the plain one-model trainer (an `nn.Module`, `torch.optim`, `LambdaLR`).
`train_batched` trains B models — each with its own seed and its own subset S'_b (a boolean mask
over S) — in one vectorised pass: parameters are stacked along a leading model axis, the forward
pass is `torch.func.vmap(functional_call)`, and SGD/Adam are applied to the stacked tensors with a
per-model learning rate. Both follow the same recipe semantics and the same per-model minibatch
order, so for equal (seed, subset) they give the same parameters up to float rounding.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .datasets import Dataset
from .models import build_model
from .recipes import Recipe
from .errors import DmmError


class TrainingError(DmmError):
    """Unusable training input (mask, seeds); the message names the fix."""


def derive_seeds(seed: int) -> tuple[int, int]:
    """(initialisation seed, data-order seed) drawn from one model seed."""
    init_seed, order_seed = np.random.SeedSequence(int(seed)).generate_state(2)
    return int(init_seed), int(order_seed)


def epoch_batches(indices: torch.Tensor, recipe: Recipe, order_seed: int) -> list[list[torch.Tensor]]:
    """Per-epoch minibatches of one model: a fresh permutation of its subset each epoch, last batch kept."""
    g = torch.Generator().manual_seed(order_seed)
    epochs = []
    for _ in range(recipe.epochs):
        perm = indices[torch.randperm(len(indices), generator=g)]
        epochs.append(list(perm.split(recipe.batch_size)))
    return epochs


def _check_mask(mask, n_train: int) -> torch.Tensor:
    mask = torch.as_tensor(np.asarray(mask))
    if mask.dtype != torch.bool or mask.shape != (n_train,):
        raise TrainingError(f"a subset mask must be a boolean vector of length n_train={n_train}; "
                            f"got {tuple(mask.shape)} {mask.dtype}")
    if not mask.any():
        raise TrainingError("a subset mask selects no training point; keep at least one")
    return mask


def train_model(model_name: str, data: Dataset, recipe: Recipe, seed: int, mask=None,
                device: str | torch.device = "cpu") -> nn.Module:
    """Train one model on S' = {i : mask[i]} (all of S when mask is None) with `recipe` and `seed`."""
    mask = torch.ones(data.n_train, dtype=torch.bool) if mask is None else _check_mask(mask, data.n_train)
    init_seed, order_seed = derive_seeds(seed)
    model = build_model(model_name, data.input_shape, data.num_classes, init_seed).to(device)
    batches = epoch_batches(mask.nonzero().squeeze(1), recipe, order_seed)
    total_steps = sum(len(e) for e in batches)
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                              nesterov=recipe.nesterov and recipe.momentum > 0, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, betas=recipe.betas, eps=recipe.eps,
                               weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: recipe.lr_factor(t, total_steps))
    x, y = data.x_train.to(device), data.y_train.to(device)
    model.train()
    for epoch in batches:
        for idx in epoch:
            idx = idx.to(device)
            loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@dataclass
class BatchedResult:
    """Stacked state of B trained models (leading axis = model) and their logits on all points."""
    state: dict[str, torch.Tensor]  # name -> (B, ...) parameters and buffers
    logits: torch.Tensor            # (B, n_points, k), train points then held-out points

    def state_dict(self, b: int) -> dict[str, torch.Tensor]:
        return {k: v[b].clone() for k, v in self.state.items()}


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


_fallback_warned: set[str] = set()


def _warn_fallback_once(model_name: str) -> None:
    if model_name not in _fallback_warned:
        _fallback_warned.add(model_name)
        warnings.warn(f"model {model_name!r} has BatchNorm, which cannot be vmapped in training mode; "
                      "training its models one at a time", RuntimeWarning, stacklevel=3)


def _batch_plan(masks: torch.Tensor, order_seeds, recipe: Recipe):
    """Index and weight tensors (epochs, steps, B, batch) padding every model to the longest epoch.

    Padded slots repeat an index of the model's own batch and carry weight 0, so no model ever
    touches a point outside its subset. Also returns the per-model lr factor table (epochs, steps, B)
    and the (epochs, steps, B) table of models that take a step.
    """
    bs, epochs = recipe.batch_size, recipe.epochs
    sizes = masks.sum(1)
    steps = int(-(-sizes.max().item() // bs))
    index = torch.zeros(epochs, steps, len(masks), bs, dtype=torch.long)
    for b, (mask, seed) in enumerate(zip(masks, order_seeds)):
        for e, batches in enumerate(epoch_batches(mask.nonzero().squeeze(1), recipe, seed)):
            perm = torch.cat(batches)
            last = len(batches) - 1
            padded = torch.cat([perm, perm[last * bs].expand(steps * bs - len(perm))])
            index[e, :, b] = padded.view(steps, bs)
    slot = torch.arange(steps * bs).view(steps, bs)
    weight = (slot < sizes.view(-1, 1, 1)).float().permute(1, 0, 2).expand(epochs, -1, -1, -1)
    steps_per_epoch = -(-sizes // bs)
    active = (torch.arange(steps).view(-1, 1) < steps_per_epoch).expand(epochs, -1, -1)
    t = torch.arange(epochs).view(-1, 1, 1) * steps_per_epoch + torch.arange(steps).view(1, -1, 1)
    total = (epochs * steps_per_epoch).expand_as(t)
    lr_factor = torch.tensor([recipe.lr_factor(int(a), int(b)) for a, b in zip(t.flatten(), total.flatten())],
                             dtype=torch.float64).view(t.shape) * active
    return index, weight, lr_factor, active


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
    def step(self, lr: torch.Tensor, active: torch.Tensor) -> None:
        r = self.recipe
        self.steps += active
        all_active = bool(active.all())
        for i, p in enumerate(self.params):
            shape = (-1,) + (1,) * (p.dim() - 1)
            state = [p, self.buf[i]] + ([self.sq[i]] if self.sq is not None else [])
            saved = None if all_active else [t.clone() for t in state]
            g = p.grad
            if r.weight_decay:
                g.add_(p, alpha=r.weight_decay)
            lr_b = lr.view(shape).to(p.dtype)
            if r.optimizer == "sgd":
                if r.momentum > 0:
                    self.buf[i].mul_(r.momentum).add_(g)
                    g = g.add_(self.buf[i], alpha=r.momentum) if r.nesterov else self.buf[i]
                p.sub_(lr_b * g)
            else:
                b1, b2 = r.betas
                self.buf[i].lerp_(g, 1 - b1)
                self.sq[i].mul_(b2).addcmul_(g, g, value=1 - b2)
                t = self.steps.clamp(min=1)
                bc1 = (1 - b1 ** t).view(shape).to(p.dtype)
                bc2_sqrt = (1 - b2 ** t).sqrt().view(shape).to(p.dtype)
                p.sub_((lr_b / bc1) * self.buf[i] / (self.sq[i].sqrt() / bc2_sqrt + r.eps))
            if saved is not None:  # models without a batch at this step keep parameters and state
                a = active.view(shape)
                for current, old in zip(state, saved):
                    current.copy_(torch.where(a, current, old))
            p.grad = None


def cross_entropy_per_sample(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """`F.cross_entropy(..., reduction="none", label_smoothing=ε)` for (N, k) logits, computed class-major.

    CPU log-softmax over a short last axis (k = 10) is an order of magnitude slower than over the
    first axis of the transposed (k, N) array; the values are the same.
    """
    logp = torch.log_softmax(logits.t().contiguous(), dim=0)
    nll = -logp.gather(0, labels.view(1, -1)).squeeze(0)
    if label_smoothing == 0:
        return nll
    return (1 - label_smoothing) * nll - label_smoothing * logp.mean(0)


def stacked_logits(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor,
                   chunk: int = 2048) -> torch.Tensor:
    """Logits (B, N, k) of B stacked models on the shared inputs x, in chunks of points."""
    def one(s, xb):
        return functional_call(model, s, (xb,))
    with torch.no_grad():
        return torch.cat([vmap(one, in_dims=(0, None))(state, xb) for xb in x.split(chunk)], dim=1)


def train_batched(model_name: str, data: Dataset, recipe: Recipe, seeds, masks,
                  device: str | torch.device = "cpu") -> BatchedResult:
    """Train B models, model b on {i : masks[b, i]} with seed seeds[b], in one vectorised pass."""
    masks = torch.as_tensor(np.asarray(masks))
    seeds = [int(s) for s in seeds]
    if masks.dim() != 2 or masks.shape[0] != len(seeds):
        raise TrainingError(f"masks must be (B, n_train) with one seed per row; got {tuple(masks.shape)} "
                            f"and {len(seeds)} seeds")
    for m in masks:
        _check_mask(m, data.n_train)
    derived = [derive_seeds(s) for s in seeds]
    models = [build_model(model_name, data.input_shape, data.num_classes, init) for init, _ in derived]
    x_all = data.all_inputs().to(device)
    if has_batchnorm(models[0]):
        _warn_fallback_once(model_name)
        trained = [train_model(model_name, data, recipe, s, m, device) for s, m in zip(seeds, masks)]
        state = {k: torch.stack([t.state_dict()[k] for t in trained]) for k in trained[0].state_dict()}
        with torch.no_grad():
            logits = torch.stack([torch.cat([t(xb) for xb in x_all.split(1024)]) for t in trained])
        return BatchedResult(state, logits)

    params, buffers = stack_module_state(models)
    params = {k: v.detach().to(device).requires_grad_(True) for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    base = models[0].to("meta")
    index, weight, lr_factor, active = _batch_plan(masks, [o for _, o in derived], recipe)
    opt = StackedOptimizer(list(params.values()), recipe)
    x, y = data.x_train.to(device), data.y_train.to(device)

    def forward(p, b, xb):
        return functional_call(base, (p, b), (xb,))

    batched_forward = vmap(forward)
    for e in range(index.shape[0]):
        for s in range(index.shape[1]):
            idx, w = index[e, s].to(device), weight[e, s].to(device)
            flat = idx.flatten()
            logits = batched_forward(params, buffers, x.index_select(0, flat).view(*idx.shape, *x.shape[1:]))
            ce = cross_entropy_per_sample(logits.flatten(0, 1), y.index_select(0, flat),
                                          recipe.label_smoothing).view_as(w)
            loss = ((ce * w).sum(1) / w.sum(1).clamp(min=1)).sum()
            loss.backward()
            opt.step(recipe.lr * lr_factor[e, s].to(device), active[e, s].to(device))
    state = {k: v.detach() for k, v in {**params, **buffers}.items()}
    return BatchedResult(state, stacked_logits(base, state, x_all))
