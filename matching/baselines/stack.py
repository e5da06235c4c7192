"""N models of one architecture as stacked tensors (leading axis = model), as the training engine
holds them: a method written over a `ModelStack` runs on N models in one vectorised pass, and one
model is the case N = 1.

The forward pass is a chain of batched matmuls for a Flatten → Linear → ReLU → … → Linear model
(`attribution.grouped_mlp.linear_chain`; several times cheaper than vmap on a CPU) and `vmap(functional_call)`
over the model axis for any other. A training step's gradients (`gradient_function`) are backpropagated by
hand through a chain, as the engine trains it (`GroupedMLP.backward`), and by autograd through any other
model. BatchNorm in training mode normalises each model's batch by its own statistics and moves its own
running statistics: vmap runs `F.batch_norm` with the stacked (N, C) buffers (in_dims=0) in place.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from attribution.datasets import Dataset
from attribution.engine import stacked_logits
from attribution.grouped_mlp import GroupedMLP, linear_chain
from attribution.recipes import Recipe


@dataclass
class ModelStack:
    base: nn.Module                  # the architecture on the meta device; the tensors below hold the values
    params: dict[str, torch.Tensor]  # name -> (N, ...)
    buffers: dict[str, torch.Tensor]

    @classmethod
    def of(cls, models: list[nn.Module]) -> "ModelStack":
        params, buffers = stack_module_state(models)
        return cls(copy.deepcopy(models[0]).to("meta"), {k: v.detach() for k, v in params.items()}, buffers)

    @property
    def size(self) -> int:
        return next(iter(self.params.values())).shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def copy(self) -> "ModelStack":
        """An independent copy (the tensors cloned contiguous, the structure shared)."""
        return ModelStack(self.base, {k: v.detach().clone(memory_format=torch.contiguous_format)
                                      for k, v in self.params.items()},
                          {k: v.clone() for k, v in self.buffers.items()})

    def state(self) -> dict[str, torch.Tensor]:
        """The stacked state dict (N, ...) of parameters and buffers."""
        return {**{k: v.detach() for k, v in self.params.items()}, **self.buffers}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, b, k) of model n on its own inputs x[n] (x: (N, b, ...)), in the base's mode, with autograd."""
        layers = linear_chain(self.base)
        if layers is not None:  # H_l = relu(H_{l-1} W_lᵀ + b_l), one baddbmm per layer for all N models
            h = x.flatten(2)
            for i, name in enumerate(layers):
                w, b = self.params[f"{name}.weight"], self.params[f"{name}.bias"]
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
                h = torch.relu(h) if i < len(layers) - 1 else h
            return h
        return vmap(lambda p, b, xb: functional_call(self.base, (p, b), (xb,)))(self.params, self.buffers, x)

    def gradient_function(self, names: list[str]) -> Callable:
        """grads(x, loss) -> [∂loss(logits)/∂θ_k for k in `names`], logits (N, b, k) = `forward(x)` in the
        base's mode and loss a scalar function of them. A linear chain is backpropagated by hand
        (`GroupedMLP.backward`, only down to the lowest layer in `names`; autograd takes ∂loss/∂logits) on
        views of the stack's tensors (contiguous, as `copy` makes them), so it sees their in-place updates;
        any other model by autograd through `forward` (the named parameters are made to require grad)."""
        layers = linear_chain(self.base)
        if layers is None:
            tensors = [self.params[k].requires_grad_(True) for k in names]
            return lambda x, loss: list(torch.autograd.grad(loss(self.forward(x)), tensors))
        chain = GroupedMLP(self.params, layers)
        first = min(layers.index(k.rsplit(".", 1)[0]) for k in names)
        order = [f"{n}.weight" for n in layers[first:]] + [f"{n}.bias" for n in layers[first:]]
        pick = [(order.index(k), self.params[k].shape) for k in names]

        def grads(x: torch.Tensor, loss: Callable) -> list[torch.Tensor]:
            *h, z = chain.forward(x)
            (grad_z,) = torch.autograd.grad(loss(z.requires_grad_(True).transpose(1, 2)), z)
            out = chain.backward(h, grad_z, first)
            return [out[i].view(shape) for i, shape in pick]
        return grads

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, P, k) of every model in eval mode on the shared inputs x (P, ...), no autograd."""
        self.base.eval()
        layers = linear_chain(self.base)
        if layers is not None:
            return GroupedMLP(self.state(), layers).logits(x.to(self.device))
        return stacked_logits(self.base, self.state(), x.to(self.device))

    def module(self, n: int, like: nn.Module | None = None) -> nn.Module:
        """Model n as an `nn.Module` in eval mode (a copy of `like`'s structure and device when given)."""
        model = copy.deepcopy(like) if like is not None else copy.deepcopy(self.base).to_empty(device=self.device)
        model.load_state_dict({k: v[n] for k, v in self.state().items()})
        return model.eval()


def stacked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE (N, b) of each model's logits (N, b, k) at its labels (N, b): a log-softmax over the class axis of
    each model's own (k, b) slab (class-major, fast on a CPU as `cross_entropy_per_sample`), so that model n's
    values are bitwise those of the model run alone; one (k, N·b) array would put its points in other
    vector lanes, and round them otherwise, for another N."""
    logp = torch.log_softmax(logits.transpose(1, 2).contiguous(), dim=1)
    return -logp.gather(1, labels.unsqueeze(1)).squeeze(1)


@dataclass(frozen=True)
class StackedTask:
    """What a stacked method may use: N models, the data, F and the hyperparameters.

    Model n draws its random choices from `seeds[n]`; `model_name` and `recipe` (how the models were
    trained) are needed by `retrain` only."""
    stack: ModelStack
    data: Dataset
    forget_ids: np.ndarray
    config: object
    seeds: tuple[int, ...]
    model_name: str | None = None
    recipe: Recipe | None = None

    def retain_ids(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.data.n_train), self.forget_ids)


@dataclass(frozen=True)
class StackedResult:
    """A stacked method's output: the N unlearned models and the per-model stats of the run
    (steps, sample_grads: Σ minibatch sizes of the gradient evaluations)."""
    stack: ModelStack
    stats: dict
