"""Training engine: A(S') for one model, and for B models at once.

`train_model` is the plain one-model trainer (an `nn.Module`, `torch.optim`, `LambdaLR`).
`train_batched` trains B models — each with its own seed and its own subset S'_b (a boolean mask
over S) — vectorised over the models: parameters are stacked along a leading model axis; a
Linear/ReLU chain is stepped with hand-written batched matmuls (`grouped_mlp`), any other
architecture with `torch.func.vmap(functional_call)` and autograd; SGD/Adam are applied to the
stacked tensors with a per-model learning rate. Both trainers follow the same recipe semantics and
the same per-model minibatch order and augmentation draws (`augment`), so for equal (seed, subset)
they give the same parameters up to float rounding. With a fixed thread count and CPU, each trainer
is bitwise deterministic given seeds.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .augment import Augmentation
from .datasets import Dataset
from .evaluation import model_logits
from .grouped_mlp import GroupedMLP, linear_chain
from .models import build_model
from .recipes import Recipe
from .errors import DmmError


class TrainingError(DmmError):
    """Unusable training input (mask, seeds); the message names the fix."""


def derive_seeds(seed: int) -> tuple[int, int]:
    """(initialisation seed, data-order seed) drawn from one model seed."""
    init_seed, order_seed = np.random.SeedSequence(int(seed)).generate_state(2)
    return int(init_seed), int(order_seed)


def epoch_permutations(indices: torch.Tensor, epochs: int, order_seed: int) -> list[torch.Tensor]:
    """The order in which one model visits its subset: a fresh permutation of `indices` each epoch."""
    g = torch.Generator().manual_seed(order_seed)
    return [indices[torch.randperm(len(indices), generator=g)] for _ in range(epochs)]


def _check_mask(mask, n_train: int) -> torch.Tensor:
    mask = torch.as_tensor(np.asarray(mask))
    if mask.dtype != torch.bool or mask.shape != (n_train,):
        raise TrainingError(f"a subset mask must be a boolean vector of length n_train={n_train}; "
                            f"got {tuple(mask.shape)} {mask.dtype}")
    if not mask.any():
        raise TrainingError("a subset mask selects no training point; keep at least one")
    return mask


def train_model(model_name: str, data: Dataset, recipe: Recipe, seed: int, mask=None,
                device: str | torch.device = "cpu", init: dict[str, torch.Tensor] | None = None,
                recorder=None) -> nn.Module:
    """Train one model on S' = {i : mask[i]} (all of S when mask is None) with `recipe` and `seed`, from
    the state dict `init` when given (else from the initialisation the seed draws).

    `recorder` (e.g. `update_record.UpdateRecorder`) sees θ_0 (`recorder.start(model)`) and, after every
    optimiser step, the batch's ids (`recorder.step(idx, model)`); it reads, so the training is unchanged."""
    mask = torch.ones(data.n_train, dtype=torch.bool) if mask is None else _check_mask(mask, data.n_train)
    augment = Augmentation.from_recipe(recipe, data.input_shape)
    init_seed, order_seed = derive_seeds(seed)
    model = build_model(model_name, data.input_shape, data.num_classes, init_seed)
    if init is not None:
        model.load_state_dict(init)
    model = model.to(device)
    order = epoch_permutations(mask.nonzero().squeeze(1), recipe.epochs, order_seed)
    batches = [perm.split(recipe.batch_size) for perm in order]
    total_steps = sum(len(e) for e in batches)  # minibatches of every epoch; the last one may be short
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                              nesterov=recipe.nesterov and recipe.momentum > 0, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, betas=recipe.betas, eps=recipe.eps,
                               weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: recipe.lr_factor(t, total_steps))
    x, y = data.x_train.to(device), data.y_train.to(device)
    generator = augment.generator(seed) if augment else None
    model.train()
    if recorder is not None:
        recorder.start(model)
    for epoch in batches:
        for idx in epoch:
            idx = idx.to(device)
            xb = x[idx]
            if augment:
                xb = augment(xb, augment.draw(generator, recipe.batch_size)[:len(idx)].to(device))
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if recorder is not None:
                recorder.step(idx, model)
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

    A slot's weight is 1/|batch| (the minibatch mean); padded slots repeat an index of the model's own
    last batch and carry weight 0, so no model ever touches a point outside its subset. Also returns
    the per-model lr factor table (epochs, steps, B) and the (epochs, steps, B) table of models that
    take a step.
    """
    bs, epochs = recipe.batch_size, recipe.epochs
    sizes = masks.sum(1)
    steps = int(-(-sizes.max().item() // bs))
    slots = torch.arange(steps * bs)
    index = torch.empty(epochs, len(masks), steps * bs, dtype=torch.long)
    for b, (mask, seed) in enumerate(zip(masks, order_seeds)):
        n = int(sizes[b])
        index[:, b, :n] = torch.stack(epoch_permutations(mask.nonzero().squeeze(1), epochs, seed))
        index[:, b, n:] = index[:, b, (n - 1) // bs * bs].unsqueeze(1)
    index = index.view(epochs, len(masks), steps, bs).transpose(1, 2).contiguous()
    counts = (slots.view(steps, 1, bs) < sizes.view(1, -1, 1)).float()
    weight = (counts / counts.sum(2, keepdim=True).clamp(min=1)).expand(epochs, -1, -1, -1)
    steps_per_epoch = (-(-sizes // bs)).numpy()
    active = np.arange(steps).reshape(1, -1, 1) < steps_per_epoch
    t = np.arange(epochs).reshape(-1, 1, 1) * steps_per_epoch + np.arange(steps).reshape(1, -1, 1)
    lr_factor = recipe.lr_factor(t, epochs * steps_per_epoch) * active
    return index, weight, torch.from_numpy(lr_factor), torch.from_numpy(np.broadcast_to(active, t.shape).copy())


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


DEFAULT_GROUP_SIZE = 256  # models per vectorised pass: bounds activation memory, keeps each op large


def train_batched(model_name: str, data: Dataset, recipe: Recipe, seeds, masks,
                  device: str | torch.device = "cpu", group_size: int = DEFAULT_GROUP_SIZE,
                  init: dict[str, torch.Tensor] | None = None) -> BatchedResult:
    """Train B models, model b on {i : masks[b, i]} with seed seeds[b], vectorised over the models,
    model b from the state {k: init[k][b]} when `init` (stacked (B, ...)) is given.

    The models are trained `group_size` at a time, one vectorised pass per group. A model's result
    does not depend on its group bitwise with one torch thread; with more, a small group's matmuls may
    be split across threads otherwise and results agree to float rounding (≈ 1e-7).
    """
    masks = torch.as_tensor(np.asarray(masks))
    seeds = [int(s) for s in seeds]
    if masks.dim() != 2 or masks.shape[0] != len(seeds):
        raise TrainingError(f"masks must be (B, n_train) with one seed per row; got {tuple(masks.shape)} "
                            f"and {len(seeds)} seeds")
    if group_size < 1:
        raise TrainingError(f"group_size must be >= 1; got {group_size}")
    for m in masks:
        _check_mask(m, data.n_train)
    augment = Augmentation.from_recipe(recipe, data.input_shape)
    derived = [derive_seeds(s) for s in seeds]
    if has_batchnorm(build_model(model_name, data.input_shape, data.num_classes, derived[0][0])):
        _warn_fallback_once(model_name)
        trained = [train_model(model_name, data, recipe, s, m, device, None if init is None else
                               {k: v[b] for k, v in init.items()}) for b, (s, m) in enumerate(zip(seeds, masks))]
        state = {k: torch.stack([t.state_dict()[k] for t in trained]) for k in trained[0].state_dict()}
        logits = torch.stack([model_logits(t, data.all_inputs()) for t in trained]).to(device)
        return BatchedResult(state, logits)
    models = [build_model(model_name, data.input_shape, data.num_classes, init_seed) for init_seed, _ in derived]
    if init is not None:
        for b, model in enumerate(models):
            model.load_state_dict({k: v[b] for k, v in init.items()})
    results = [_train_group(models[lo:lo + group_size], seeds[lo:lo + group_size], masks[lo:lo + group_size],
                            data, recipe, device, augment)
               for lo in range(0, len(seeds), group_size)]
    state = {k: torch.cat([r.state[k] for r in results]) for k in results[0].state}
    return BatchedResult(state, torch.cat([r.logits for r in results]))


def _train_group(models: list[nn.Module], seeds: list[int], masks: torch.Tensor, data: Dataset,
                 recipe: Recipe, device, augment: Augmentation | None) -> BatchedResult:
    """One vectorised pass over a group of models: hand-written MLP steps where the architecture is a
    Linear/ReLU chain (`grouped_mlp`), `vmap(functional_call)` + autograd for anything else. With
    `augment`, a model draws its batch's augmentation from its own generator at the steps it takes."""
    params, buffers = stack_module_state(models)
    params = {k: v.detach().to(device) for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    layers = linear_chain(models[0])
    if layers is not None:
        grouped = GroupedMLP(params, layers)
        trainable = grouped.parameters()

        def gradients(xb, yb, w):
            return grouped.gradients(xb, yb, w, recipe.label_smoothing)
    else:
        base = copy.deepcopy(models[0]).to("meta")  # structure only: the stacked tensors hold the values
        trainable = [v.requires_grad_(True) for v in params.values()]
        batched_forward = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)))

        def gradients(xb, yb, w):
            logits = batched_forward(params, buffers, xb)
            ce = cross_entropy_per_sample(logits.flatten(0, 1), yb.flatten(), recipe.label_smoothing).view_as(w)
            return list(torch.autograd.grad((ce * w).sum(), trainable))

    index, weight, lr_factor, active = _batch_plan(masks, [derive_seeds(s)[1] for s in seeds], recipe)
    opt = StackedOptimizer(trainable, recipe)
    x, y = data.x_train.to(device), data.y_train.to(device)
    generators = [augment.generator(s) for s in seeds] if augment else None
    for e in range(index.shape[0]):
        for s in range(index.shape[1]):
            idx, w = index[e, s].to(device), weight[e, s].to(device)
            flat = idx.flatten()
            xb = x.index_select(0, flat)
            if augment:
                idle = torch.zeros(recipe.batch_size, dtype=torch.long)  # a model without a batch draws nothing
                codes = [augment.draw(g, recipe.batch_size) if a else idle
                         for g, a in zip(generators, active[e, s].tolist())]
                xb = augment(xb, torch.cat(codes).to(device))
            grads = gradients(xb.view(*idx.shape, *x.shape[1:]), y.index_select(0, flat).view(idx.shape), w)
            opt.step(grads, recipe.lr * lr_factor[e, s].to(device), active[e, s].to(device))
    x_all = data.all_inputs().to(device)
    if layers is not None:
        return BatchedResult({**grouped.state_dict(), **buffers}, grouped.logits(x_all))
    state = {k: v.detach() for k, v in {**params, **buffers}.items()}
    return BatchedResult(state, stacked_logits(base, state, x_all))
