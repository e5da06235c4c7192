"""cnn1d's head on its precomputed windows, and its matching step with hand-written gradients.

With `train_blocks` = 2 on `cnn1d` the matching trains the head [MatmulConv1d, ReLU, Flatten, Linear] on the frozen
trunk's outputs. Its convolution's windows of them, R (N·L', k·C), never change, so they are computed once
(`precomputed_windows`) and the head takes them (`WindowedConv1d`). A step is then a few small matmuls, and autograd's
bookkeeping would be most of its cost, so the step's gradients are written out (as `attribution.grouped_mlp` does for
the MLP's training), with W1 the kernel laid out (O, k·C) like R and flat() the head's Flatten of (N, O, L'):

    forward   Z1 = R W1ᵀ + b1,   H = relu(Z1),   Z2 = flat(H) W2ᵀ + b2
    loss      L = mean((Z2 − T)²)
    backward  ∂Z2 = 2 (Z2 − T) / |Z2|,   ∂W2 = ∂Z2ᵀ flat(H),   ∂b2 = Σ_rows ∂Z2,
              ∂Z1 = flat⁻¹(∂Z2 W2) ⊙ [Z1 > 0],   ∂W1 = ∂Z1ᵀ R,   ∂b1 = Σ_rows ∂Z1

These are the gradients autograd computes through the head (to the bit on this project's CPU; tests/test_matching.py
holds them to 1e-7), and a step costs half as much on a CPU thread (`benchmarks/bench_matching_step.py`: 0.24 ms
against 0.51 for 64 points).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attribution.models import MatmulConv1d, WindowedConv1d


@torch.no_grad()
def precomputed_windows(head: nn.Sequential, inputs: torch.Tensor) -> tuple[nn.Sequential, torch.Tensor]:
    """(head, inputs) with the head's first layer's input side computed once where it is a `MatmulConv1d` on frozen
    inputs: its windows, and the head that takes them (`WindowedConv1d`, the same parameters); else unchanged.
    A step on up to `MATMUL_MAX_BATCH` points is the same to the bit; a larger batch, and the full loss on F ∪ R, take
    the matmul instead of nn.Conv1d's kernel (equal up to rounding)."""
    if not isinstance(head[0], MatmulConv1d):
        return head, inputs
    return nn.Sequential(WindowedConv1d(head[0]), *head[1:]), head[0].windows(inputs)


def windowed_head_gradient(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """gradient(R, T): sets the head's .grad to ∂L/∂θ (module docstring) and returns L, for a head
    [WindowedConv1d, ReLU, Flatten, Linear] (cnn1d's last two blocks after `precomputed_windows`); None for any other."""
    kinds = (WindowedConv1d, nn.ReLU, nn.Flatten, nn.Linear)
    if not (isinstance(model, nn.Sequential) and len(model) == len(kinds)
            and all(isinstance(layer, kind) for layer, kind in zip(model, kinds))
            and (model[2].start_dim, model[2].end_dim) == (1, -1) and model[3].bias is not None):
        return None
    conv, linear = model[0].conv, model[3]
    (kernel,), channels = conv.kernel_size, conv.out_channels

    @torch.no_grad()
    def gradient(windows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, length, width = windows.shape
        rows = windows.reshape(n * length, width)
        w1 = conv.weight.transpose(1, 2).reshape(channels, width)
        z1 = torch.addmm(conv.bias, rows, w1.t())                                    # Z1 (N·L', O)
        h = z1.relu().view(n, length, channels).transpose(1, 2).flatten(1)           # flat(H) (N, O·L')
        z2 = torch.addmm(linear.bias, h, linear.weight.t())
        grad_z2 = (z2 - targets).mul_(2.0 / z2.numel())
        grad_h = (grad_z2 @ linear.weight).view(n, channels, length).transpose(1, 2).reshape(n * length, channels)
        grad_z1 = torch.ops.aten.threshold_backward(grad_h, z1, 0)                  # ReLU's backward, as autograd's
        linear.weight.grad, linear.bias.grad = grad_z2.t() @ h, grad_z2.sum(0)
        conv.weight.grad = (grad_z1.t() @ rows).view(channels, kernel, -1).transpose(1, 2).contiguous()
        conv.bias.grad = grad_z1.sum(0)
        return F.mse_loss(z2, targets)

    return gradient
