"""Training engine: A(S') for one model, and for B models at once.

`train_model` is the plain one-model trainer (an `nn.Module`, `torch.optim`, `LambdaLR`).
`train_batched` trains B models — each with its own seed and its own subset S'_b (a boolean mask
over S) — vectorised over the models: parameters (and buffers: BatchNorm's running statistics) are
stacked along a leading model axis; a Linear/ReLU chain is stepped with hand-written batched matmuls
(`grouped_mlp`), a network of convolutions, BatchNorm, pooling and Linear layers (ResNet-9) as one
network with the models folded into its channels (`folded`), any other with
`torch.func.vmap(functional_call)` (`batched_norm`), and both with autograd; BatchNorm takes per-model
batch and running statistics. SGD/Adam are applied to the stacked tensors with a per-model learning
rate. A model with a module that vmap cannot run is trained one at a time, with a warning naming it.
Both trainers follow the same recipe semantics and the same per-model minibatch order and augmentation
draws (`augment`), so for equal (seed, subset) they give the same parameters and buffers up to float
rounding. With a fixed thread count and CPU, each
trainer is bitwise deterministic given seeds.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .augment import Augmentation
from .batched_norm import NotVectorisable, StackedForward
from .folded import Folded
from .datasets import Dataset
from .evaluation import model_logits
from .grouped_mlp import GroupedMLP, linear_chain
from .models import build_model
from .recipes import Recipe
from .stacked_optimizer import StackedOptimizer
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
                recorder=None, channels_last: bool = False) -> nn.Module:
    """Train one model on S' = {i : mask[i]} (all of S when mask is None) with `recipe` and `seed`, from
    the state dict `init` when given (else from the initialisation the seed draws).

    `recorder` (e.g. `update_record.UpdateRecorder`) sees θ_0 (`recorder.start(model)`) and, after every
    optimiser step, the batch's ids (`recorder.step(idx, model)`); it reads, so the training is unchanged.
    `channels_last` lays images and convolution weights out channels-last (the same values, faster kernels)."""
    mask = torch.ones(data.n_train, dtype=torch.bool) if mask is None else _check_mask(mask, data.n_train)
    augment = Augmentation.from_recipe(recipe, data.input_shape)
    init_seed, order_seed = derive_seeds(seed)
    model = build_model(model_name, data.input_shape, data.num_classes, init_seed)
    if init is not None:
        model.load_state_dict(init)
    layout = torch.channels_last if channels_last and len(data.input_shape) == 3 else torch.contiguous_format
    model = model.to(device, memory_format=layout)
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
            logits = model(xb.contiguous(memory_format=layout))
            loss = F.cross_entropy(logits, y[idx], label_smoothing=recipe.label_smoothing)
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
    group_size: int = 1             # models trained at once (one vectorised pass)

    def state_dict(self, b: int) -> dict[str, torch.Tensor]:
        return {k: v[b].clone() for k, v in self.state.items()}


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


_fallback_warned: set[str] = set()


def _warn_fallback_once(model_name: str, problem: NotVectorisable) -> None:
    if model_name not in _fallback_warned:
        _fallback_warned.add(model_name)
        warnings.warn(f"model {model_name!r}: {problem} — it cannot be vectorised over models; training its "
                      "models one at a time", RuntimeWarning, stacklevel=3)


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


DEFAULT_GROUP_SIZE = 256  # most models per vectorised pass: keeps each op large
CPU_GROUP_TENSOR_BYTES = 8 << 20  # on a CPU, a group's largest activation: bigger grouped steps ran slower than
                                  # one model at a time (cache, page faults; benchmarks/bench_training.py)
GPU_MEMORY_SHARE = 4  # on a GPU, a group's training step takes at most 1/4 of the device's total memory


def group_size_for(model: nn.Module, x: torch.Tensor, batch_size: int, device) -> int:
    """Models per vectorised pass of a network that is not an MLP chain, at most DEFAULT_GROUP_SIZE: on a GPU
    as many as fit their training step — ≈ 3 floats (saved activation, its gradient, a temporary) per output
    value of every leaf module and sample, counted on x[:1] — into 1/GPU_MEMORY_SHARE of its total memory (not
    its free memory, which changes from one run to the next: the group decides a model's rounding, and a retried
    task must write the same bytes); on a CPU as many as keep the group's largest activation within
    CPU_GROUP_TENSOR_BYTES."""
    values = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: values.append(out.numel()))
             for m in model.modules() if not list(m.children())]
    mode = model.training
    with torch.no_grad():
        model.eval()(x[:1])
    model.train(mode)
    for h in hooks:
        h.remove()
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fit = total // GPU_MEMORY_SHARE // (3 * 4 * sum(values) * batch_size)
    else:
        fit = CPU_GROUP_TENSOR_BYTES // (4 * max(values) * batch_size)
    return int(min(DEFAULT_GROUP_SIZE, max(1, fit)))


def train_batched(model_name: str, data: Dataset, recipe: Recipe, seeds, masks,
                  device: str | torch.device = "cpu", group_size: int | None = None,
                  init: dict[str, torch.Tensor] | None = None, channels_last: bool = False) -> BatchedResult:
    """Train B models, model b on {i : masks[b, i]} with seed seeds[b], vectorised over the models,
    model b from the state {k: init[k][b]} when `init` (stacked (B, ...)) is given.

    The models are trained `group_size` at a time, one vectorised pass per group (None: as many as
    fit in memory, `group_size_for`). An MLP's result does not depend on its group bitwise with one torch
    thread; with more, a small group's matmuls may be split across threads otherwise, and other models'
    convolutions run grouped otherwise: results agree to float rounding (≈ 1e-7). On a GPU an MLP's last
    group is padded to full width (`group_indices`), so a model's result does not depend on how many
    are trained with it; other networks' kernels round a group otherwise than one model, and a ReLU that
    flips during training amplifies that. `channels_last` lays images out channels-last (both trainers; a
    folded network's activations, `folded.fold`).
    """
    masks = torch.as_tensor(np.asarray(masks))
    seeds = [int(s) for s in seeds]
    if masks.dim() != 2 or masks.shape[0] != len(seeds):
        raise TrainingError(f"masks must be (B, n_train) with one seed per row; got {tuple(masks.shape)} "
                            f"and {len(seeds)} seeds")
    if group_size is not None and group_size < 1:
        raise TrainingError(f"group_size must be >= 1; got {group_size}")
    for m in masks:
        _check_mask(m, data.n_train)
    augment = Augmentation.from_recipe(recipe, data.input_shape)
    models = [build_model(model_name, data.input_shape, data.num_classes, derive_seeds(s)[0]) for s in seeds]
    if init is not None:
        for b, model in enumerate(models):
            model.load_state_dict({k: v[b] for k, v in init.items()})
    try:
        forward = _stacked_forward(models[0], data.x_train[:2], channels_last)
    except NotVectorisable as problem:
        _warn_fallback_once(model_name, problem)
        return _one_at_a_time(model_name, data, recipe, seeds, masks, device, init, channels_last)
    if group_size is None:
        group_size = (DEFAULT_GROUP_SIZE if forward is None else
                      group_size_for(models[0], data.x_train, recipe.batch_size, device))
    groups = group_indices(len(seeds), group_size, forward is None and pads_groups(device))
    results = [_train_group([models[i] for i in g], [seeds[i] for i in g], masks[g], data, recipe, device, augment,
                            forward) for g in groups]
    state = {k: torch.cat([r.state[k] for r in results])[:len(seeds)] for k in results[0].state}
    return BatchedResult(state, torch.cat([r.logits for r in results])[:len(seeds)], group_size)


FULL_GROUP_DEVICES = ("cuda",)  # where a Linear/ReLU chain's groups all run at full width


def pads_groups(device) -> bool:
    """Whether a Linear/ReLU chain's last group is padded to full width on `device` (`group_indices`)."""
    return torch.device(device).type in FULL_GROUP_DEVICES


def group_indices(count: int, width: int, full: bool) -> list[list[int]]:
    """The models of each vectorised pass over `count` models, `width` at a time; with `full`, the last group
    is filled to `width` with copies of its last model (drop them from the result after the pass).

    A GPU's batched matmul picks its kernels by the number of models it holds (one model: another split of
    the sums than 64), so a model's rounding would depend on how many ran with it; at full width every
    model meets the same kernels. A small MLP's step on a GPU is bound by kernel launches, not flops."""
    groups = [list(range(lo, min(lo + width, count))) for lo in range(0, count, width)]
    if full:
        groups[-1] += groups[-1][-1:] * (width - len(groups[-1]))
    return groups


def _stacked_forward(model: nn.Module, x: torch.Tensor, channels_last: bool) -> Folded | StackedForward | None:
    """How groups of models like `model` are stepped: None for a Linear/ReLU chain (`grouped_mlp`), the folded
    network where every module folds, else vmap; raises `NotVectorisable` naming a module vmap cannot run."""
    if linear_chain(model) is not None:
        return None
    folded = Folded.of(model, x, channels_last)
    if folded is not None:
        return folded
    forward = StackedForward(model)
    forward.check(model, x)
    return forward


def _one_at_a_time(model_name: str, data: Dataset, recipe: Recipe, seeds: list[int], masks: torch.Tensor,
                   device, init: dict[str, torch.Tensor] | None, channels_last: bool) -> BatchedResult:
    """`train_batched`'s result by `train_model`, model after model."""
    trained = [train_model(model_name, data, recipe, s, m, device, None if init is None else
                           {k: v[b] for k, v in init.items()}, channels_last=channels_last)
               for b, (s, m) in enumerate(zip(seeds, masks))]
    state = {k: torch.stack([t.state_dict()[k] for t in trained]) for k in trained[0].state_dict()}
    logits = torch.stack([model_logits(t, data.all_inputs()) for t in trained]).to(device)
    return BatchedResult(state, logits)


def _train_group(models: list[nn.Module], seeds: list[int], masks: torch.Tensor, data: Dataset,
                 recipe: Recipe, device, augment: Augmentation | None,
                 forward: Folded | StackedForward | None) -> BatchedResult:
    """One vectorised pass over a group of models: hand-written MLP steps where the architecture is a
    Linear/ReLU chain (`grouped_mlp`, `forward` None), `forward` (folded or vmap) + autograd for anything
    else, told which slots of a padded step are real. With `augment`, a model draws its batch's augmentation from its
    own generator at the steps it takes."""
    params, buffers = stack_module_state(models)
    params = {k: v.detach().to(device) for k, v in params.items()}
    if isinstance(forward, Folded):
        params = forward.laid_out(params)
    buffers = {k: v.to(device) for k, v in buffers.items()}
    if forward is None:
        grouped = GroupedMLP(params, linear_chain(models[0]))
        trainable = grouped.parameters()

        def gradients(xb, yb, w, valid):
            return grouped.gradients(xb, yb, w, recipe.label_smoothing)
    else:
        forward.base.train()
        trainable = [v.requires_grad_(True) for v in params.values()]

        def gradients(xb, yb, w, valid):
            logits = forward(params, buffers, xb, valid)
            ce = cross_entropy_per_sample(logits.flatten(0, 1), yb.flatten(), recipe.label_smoothing).view_as(w)
            return list(torch.autograd.grad((ce * w).sum(), trainable))

    index, weight, lr_factor, active = _batch_plan(masks, [derive_seeds(s)[1] for s in seeds], recipe)
    opt = StackedOptimizer(trainable, recipe)
    x, y = data.x_train.to(device), data.y_train.to(device)
    generators = [augment.generator(s) for s in seeds] if augment else None
    for e in range(index.shape[0]):
        for s in range(index.shape[1]):
            idx, w = index[e, s], weight[e, s]
            if forward is not None:  # only the slots some model fills: equal real lengths need no slot mask
                width = int((w > 0).sum(1).max())
                idx, w = idx[:, :width], w[:, :width]
            valid = None if bool((w > 0).all()) else (w > 0).to(device)
            idx, w = idx.to(device), w.to(device)
            flat = idx.flatten()
            xb = x.index_select(0, flat)
            if augment:
                idle = torch.zeros(recipe.batch_size, dtype=torch.long)  # a model without a batch draws nothing
                codes = [augment.draw(g, recipe.batch_size) if a else idle
                         for g, a in zip(generators, active[e, s].tolist())]
                xb = augment(xb, torch.stack(codes)[:, :idx.shape[1]].flatten().to(device))
            grads = gradients(xb.view(*idx.shape, *x.shape[1:]), y.index_select(0, flat).view(idx.shape), w, valid)
            opt.step(grads, recipe.lr * lr_factor[e, s].to(device), active[e, s].to(device))
    x_all = data.all_inputs().to(device)
    if forward is None:
        return BatchedResult({**grouped.state_dict(), **buffers}, grouped.logits(x_all))
    state = {k: v.detach() for k, v in {**params, **buffers}.items()}
    if isinstance(forward, Folded):
        return BatchedResult(state, forward.logits(state, x_all))
    return BatchedResult(state, stacked_logits(forward.base.eval(), state, x_all))
