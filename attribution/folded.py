"""B stacked convolutional networks run as one network, the model axis folded into the channel axis.

Model b's activation a_b (N, C, ...) is held as channels [b·C, (b+1)·C) of one tensor A (N, B·C, ...)
(channels-last in memory on request). Every layer of the B models is then one kernel call on A:

    Conv (groups g)       A ← conv(A, [W_1; …; W_B], groups = B·g)   (weights (B, O, I/g, k…) viewed (B·O, …))
    BatchNorm             A ← batch_norm over B·C channels: per model and channel, exactly `nn.BatchNorm`'s
                          statistics; the running ones are the stacked (B, C) buffers viewed (B·C,), moved in place
                          (a padded step: `batched_norm.masked_batch_norm`)
    ReLU, pooling, …      per channel, so A ← f(A) as is
    Flatten               (N, B·F), model b's features contiguous in its own order
    Linear                a bmm over the model axis
    Residual, Scale       A + f(A), s·A

This is what `vmap` makes of these layers, without its layout copies around every convolution and its
BatchNorm affine as separate passes. Only the module types above fold: `Folded.of` returns None for any
other network (which then runs under vmap) and for one whose folded eval logits differ from its own.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .batched_norm import masked_batch_norm
from .models import Residual, Scale

PER_CHANNEL = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.MaxPool1d, nn.MaxPool2d,
               nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d,
               nn.AdaptiveAvgPool2d)
CONVOLUTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _folds(module: nn.Module) -> bool:
    kind = type(module)  # exact types: a subclass may have another forward
    if kind in (nn.Sequential, Residual):
        return all(_folds(m) for m in module.children())
    if kind in CONVOLUTIONS:
        return module.padding_mode == "zeros"
    if kind in NORMS:
        return module.track_running_stats
    if kind is nn.Flatten:
        return module.start_dim == 1 and module.end_dim == -1
    return kind in PER_CHANNEL or kind in (nn.Linear, Scale)


def fold(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """(B, N, C, ...) per-model inputs → (N, B·C, ...), laid out channels-last (images only) when asked."""
    b, n, c, *spatial = x.shape
    if not channels_last or len(spatial) != 2:
        return x.transpose(0, 1).reshape(n, b * c, *spatial)
    return x.permute(1, 3, 4, 0, 2).reshape(n, *spatial, b * c).permute(0, 3, 1, 2)


class Folded:
    """forward(params, buffers, x, valid=None) → logits (B, N, k) of B stacked models on their own inputs
    x (B, N, ...) in the network's mode, with autograd; `valid` (B, N) bool marks the real slots (None: all)."""

    def __init__(self, model: nn.Module, channels_last: bool = False):
        self.base = copy.deepcopy(model).to("meta")  # structure and hyperparameters; the stacked tensors hold values
        self.channels_last = channels_last

    @classmethod
    def of(cls, model: nn.Module, x: torch.Tensor, channels_last: bool = False) -> "Folded | None":
        """The folded form of `model`, or None when it has a module that does not fold or its folded eval
        logits on the inputs x (N, ...) differ from `model`'s own."""
        if not _folds(model):
            return None
        folded = cls(model, channels_last)
        state = {k: torch.stack([v, v]) for k, v in model.state_dict().items()}
        mode = model.training
        try:
            with torch.no_grad():
                expected = model.eval()(x)
                got = folded.eval()(state, {}, x.unsqueeze(0).expand(2, *x.shape))
            same = got.shape == (2, *expected.shape) and torch.allclose(got, expected.expand_as(got), rtol=1e-4,
                                                                         atol=1e-5)
        except (RuntimeError, ValueError, TypeError):  # e.g. a Linear on image-shaped activations
            same = False
        finally:
            model.train(mode)
        return folded.train() if same else None

    def train(self, mode: bool = True) -> "Folded":
        self.base.train(mode)
        return self

    def eval(self) -> "Folded":
        return self.train(False)

    def laid_out(self, params: dict) -> dict:
        """`params` with every stacked 2-D convolution weight (B, O, I, kh, kw) stored so that its (B·O, I, kh, kw)
        view is channels-last, when the activations are: the kernels then need no weight reorder per call."""
        if not self.channels_last:
            return params
        return {k: v.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3) if v.dim() == 5 else v
                for k, v in params.items()}

    def logits(self, state: dict, x: torch.Tensor, model_points: int = 1024) -> torch.Tensor:
        """Eval-mode logits (B, P, k) of the B stacked models on the shared inputs x (P, ...), in chunks of
        about `model_points` / B points (each chunk's activations hold B copies)."""
        b = next(iter(state.values())).shape[0]
        self.eval()
        with torch.no_grad():
            return torch.cat([self(state, {}, xc.unsqueeze(0).expand(b, *xc.shape))
                              for xc in x.split(max(1, model_points // b))], dim=1)

    def __call__(self, params: dict, buffers: dict, x: torch.Tensor, valid: torch.Tensor | None = None):
        b, n = x.shape[:2]
        out = self._run(self.base, "", fold(x, self.channels_last), {**params, **buffers}, b, valid)
        return out.view(n, b, -1).transpose(0, 1)

    def _run(self, module: nn.Module, prefix: str, a: torch.Tensor, state: dict, b: int, valid) -> torch.Tensor:
        kind = type(module)
        if kind is nn.Sequential:
            for name, child in module.named_children():
                a = self._run(child, f"{prefix}{name}.", a, state, b, valid)
            return a
        if kind is Residual:
            return a + self._run(module.module, f"{prefix}module.", a, state, b, valid)
        if kind is Scale:
            return a * module.factor
        if kind is nn.Flatten:
            return a.flatten(1)
        if kind in PER_CHANNEL:
            return module(a)
        weight, bias = state.get(f"{prefix}weight"), state.get(f"{prefix}bias")
        if kind is nn.Linear:
            h = a.view(len(a), b, -1).transpose(0, 1)  # (B, N, F)
            w = weight.transpose(1, 2)
            out = h @ w if bias is None else torch.baddbmm(bias.unsqueeze(1), h, w)
            return out.transpose(0, 1).reshape(len(a), -1)
        if kind in CONVOLUTIONS:
            return CONVOLUTIONS[kind](a, weight.flatten(0, 1), None if bias is None else bias.flatten(),
                                      module.stride, module.padding, module.dilation, module.groups * b)
        return self._norm(module, prefix, a, state, weight, bias, valid)

    @staticmethod
    def _norm(module, prefix: str, a: torch.Tensor, state: dict, weight, bias, valid) -> torch.Tensor:
        """BatchNorm over the B·C folded channels, in place on the stacked running statistics."""
        mean, var = state[f"{prefix}running_mean"].view(-1), state[f"{prefix}running_var"].view(-1)
        weight, bias = (None, None) if weight is None else (weight.flatten(), bias.flatten())
        if not module.training:
            return F.batch_norm(a, mean, var, weight, bias, False, 0.0, module.eps)
        counter = state[f"{prefix}num_batches_tracked"]
        if valid is None and module.momentum is not None:
            counter.add_(1)
            return F.batch_norm(a, mean, var, weight, bias, True, module.momentum, module.eps)
        if valid is None:
            valid = torch.ones(len(counter), len(a), dtype=torch.bool, device=a.device)
        return masked_batch_norm(a, valid, mean, var, counter, weight, bias, module.momentum, module.eps)
