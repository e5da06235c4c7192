"""The forward pass of B stacked models under `vmap(functional_call)`, BatchNorm included, exactly as B
separate `nn.Module`s in training and eval mode.

BatchNorm in training mode normalises a minibatch by its own statistics and moves the running ones
(`nn.BatchNorm{1,2,3}d`): over the n = |batch| · |spatial| values x of a channel,

    y = (x − μ) / sqrt(σ² + ε) · γ + β,   μ = Σ x / n,   σ² = Σ (x − μ)² / n,
    running_mean ← (1 − m) · running_mean + m · μ,
    running_var ← (1 − m) · running_var + m · σ² · n / (n − 1),
    num_batches_tracked ← num_batches_tracked + 1     (m = momentum, or 1 / num_batches_tracked when None).

With the running statistics stacked (B, C) and vmapped with in_dims=0, `F.batch_norm` does this per model
and its in-place update lands in model b's row. What it cannot do is a batch with padding: the batched
trainer pads each model's minibatch to the longest real one of the step (`engine._batch_plan`: a short last
batch, or none at all for a model whose epoch has fewer steps). `masked_batch_norm` computes the same
quantities over the real slots v_i ∈ {0, 1} only, n = Σ_i v_i · |spatial|, μ = Σ_i v_i x_i / n,
σ² = Σ_i v_i (x_i − μ)² / n; a model with no real slot keeps its running statistics and its counter (its
padded outputs carry no loss weight). It serves both batched forwards: `StackedBatchNorm`, one model under
vmap (the slot mask from `StackedForward(..., valid=)`), and `folded`, B models folded into the channels.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


def masked_batch_norm(x: torch.Tensor, valid: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                      counter: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      momentum: float | None, eps: float) -> torch.Tensor:
    """Training-mode batch norm of G models whose C channels each are folded into x (N, G·C, *spatial), over the
    real slots only: valid (G, N) marks model g's real samples. Moves the running statistics (G·C,) and the
    counters (G,) of the models with a real slot in place, as the module docstring says; float32 statistics."""
    groups, slots = valid.shape
    channels = x.shape[1] // groups
    v = valid.float()
    real = v.sum(1) > 0
    v = torch.where(real.unsqueeze(1), v, torch.ones_like(v))  # no real slot: the padding's statistics, unused
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    mask = v.t().repeat_interleave(channels, dim=1).view((slots, -1) + (1,) * (x.dim() - 2))
    dims = [0, *range(2, x.dim())]
    n = v.sum(1).repeat_interleave(channels) * math.prod(x.shape[2:])
    xf = x.float()
    mean = (xf * mask).sum(dims) / n
    centred = xf - mean.view(per_channel)
    var = (centred * centred * mask).sum(dims) / n
    y = centred * torch.rsqrt(var + eps).view(per_channel)
    if weight is not None:
        y = y * weight.view(per_channel) + bias.view(per_channel)
    with torch.no_grad():
        counter.add_(real.long().view(counter.shape))
        m = momentum
        if m is None:  # the cumulative average: m = 1 / num_batches_tracked, per model
            m = (1.0 / counter.clamp(min=1).double()).reshape(-1).repeat_interleave(channels)
        moved = real.repeat_interleave(channels)
        running_mean.copy_(torch.where(moved, (1 - m) * running_mean + m * mean, running_mean))
        running_var.copy_(torch.where(moved, (1 - m) * running_var + m * var * n / (n - 1), running_var))
    return y.to(x.dtype)


class Slots:
    """The slot mask of the minibatch being forwarded: None (every slot real) or, inside vmap, one model's (N,)."""
    valid: torch.Tensor | None = None


class StackedBatchNorm(nn.Module):
    """A `_BatchNorm` (same parameter and buffer names) that honours `Slots.valid` in training mode."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, slots: Slots):
        super().__init__()
        self.eps, self.momentum, self.slots = bn.eps, bn.momentum, slots
        self.register_parameter("weight", bn.weight)
        self.register_parameter("bias", bn.bias)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name))
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = (self.running_mean, self.running_var)
        if not self.training:
            return F.batch_norm(x, *stats, self.weight, self.bias, False, 0.0, self.eps)
        valid = self.slots.valid
        if valid is not None or self.momentum is None:  # m = 1 / num_batches_tracked differs between models
            valid = torch.ones(1, len(x), dtype=torch.bool, device=x.device) if valid is None else valid.unsqueeze(0)
            return masked_batch_norm(x, valid, *stats, self.num_batches_tracked, self.weight, self.bias,
                                     self.momentum, self.eps)
        self.num_batches_tracked.add_(1)
        return F.batch_norm(x, *stats, self.weight, self.bias, True, self.momentum, self.eps)


class NotVectorisable(Exception):
    """A module of the model that `StackedForward` cannot run over a stack of models."""

    def __init__(self, path: str, module: nn.Module, reason: str):
        super().__init__(f"module {path or '(the model)'!r} ({type(module).__name__}): {reason}")


class StackedForward:
    """forward(params, buffers, x, valid=None) -> logits (B, N, k) of B stacked models on their own inputs
    x (B, N, ...) in the model's mode, with autograd; `valid` (B, N) bool marks the real slots (None: all)."""

    def __init__(self, model: nn.Module):
        self.slots = Slots()
        self.base = copy.deepcopy(model).to("meta")  # structure only: the stacked tensors hold the values
        for path, module in list(self.base.named_modules()):
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if not module.track_running_stats:
                    raise NotVectorisable(path, module, "BatchNorm without running statistics normalises "
                                                        "evaluation batches by their own statistics")
                parent, _, name = path.rpartition(".")
                setattr(self.base.get_submodule(parent), name, StackedBatchNorm(module, self.slots))
        self._full = vmap(self._one)
        self._masked = vmap(self._one_masked)

    def _one(self, p, b, x):
        return functional_call(self.base, (p, b), (x,))

    def _one_masked(self, p, b, x, valid):
        self.slots.valid = valid
        try:
            return self._one(p, b, x)
        finally:
            self.slots.valid = None

    def __call__(self, params, buffers, x, valid=None):
        return self._full(params, buffers, x) if valid is None else self._masked(params, buffers, x, valid)

    def check(self, model: nn.Module, x: torch.Tensor) -> None:
        """Raise `NotVectorisable` naming the innermost module that fails a training step (with and without a
        slot mask) or an eval pass of two stacked copies of `model` on x (N, ...); copies: `model` is untouched."""
        running: list[str] = []  # the modules whose forward has begun and not returned, outermost first

        def leave(*_) -> None:
            running.pop()
        hooks = [m.register_forward_pre_hook(lambda _m, _a, path=path: running.append(path))
                 for path, m in self.base.named_modules()]
        hooks += [m.register_forward_hook(leave) for m in self.base.modules()]
        params, buffers = stack_module_state([model, model])
        xs = x.unsqueeze(0).expand(2, *x.shape)
        mode = self.base.training
        try:
            for valid in (None, torch.ones(2, len(x), dtype=torch.bool)):
                self.base.train()
                out = self(params, buffers, xs, valid)
                torch.autograd.grad(out.sum(), [p for p in params.values() if p.requires_grad], allow_unused=True)
            self.base.eval()
            self(params, buffers, xs)
        except Exception as e:  # noqa: BLE001 - any failure means: not vectorisable
            path = running[-1] if running else ""
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NotVectorisable(path, self.base.get_submodule(path), f"{type(e).__name__}: {reason}") from None
        finally:
            for h in hooks:
                h.remove()
            self.base.train(mode)
