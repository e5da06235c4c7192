"""Grouped MLP: B stacked fully connected ReLU networks stepped with hand-written batched matmuls.

For a `Flatten → Linear → ReLU → … → Linear` model the training step of B models is a chain of
`baddbmm`s over the model axis, with H_0 = x and layers l = 1..L:

    forward   Z_l = H_{l-1} W_l + b_l,   H_l = relu(Z_l)
    loss      Σ_j w_j · CE(Z_L[j], y_j)      (per model; w_j = 1/|batch|, 0 on padded slots)
    backward  ∂Z_L = (softmax(Z_L) − ŷ) · w,   ŷ = (1 − ε)·onehot(y) + ε/k
              ∂W_l = H_{l-1}ᵀ ∂Z_l,   ∂b_l = Σ_j ∂Z_l[j],   ∂Z_{l-1} = ∂Z_l W_lᵀ ⊙ [Z_{l-1} > 0]

These are the gradients autograd computes through `vmap(functional_call)`; skipping autograd's and
vmap's bookkeeping makes a small model's step several times cheaper on a CPU.
"""
from __future__ import annotations

import torch
from torch import nn


def linear_chain(model: nn.Module) -> list[str] | None:
    """State-dict prefixes of the Linear layers of a `Flatten → Linear → ReLU → … → Linear` chain,
    or None when `model` is any other architecture (it then trains through vmap + autograd)."""
    if not isinstance(model, nn.Sequential) or len(model) < 2:
        return None
    head, *layers = model
    if not (isinstance(head, nn.Flatten) and head.start_dim == 1 and head.end_dim == -1):
        return None
    names = []
    for i, layer in enumerate(layers, start=1):
        if i % 2 and isinstance(layer, nn.Linear) and layer.bias is not None:
            names.append(str(i))
        elif i % 2 or not isinstance(layer, nn.ReLU):
            return None
    return names if len(layers) % 2 else None


class GroupedMLP:
    """Parameters of B MLPs in `nn.Linear`'s layout, W_l (B, out, in) and b_l (B, out, 1), and the
    gradients of one step. Activations are kept feature-major, H_lᵀ (B, features, batch), so the
    softmax runs over a leading axis and every product is a plain `bmm` with no layout copies."""

    def __init__(self, state: dict[str, torch.Tensor], layers: list[str]):
        self.layers = layers
        self.weights = [state[f"{n}.weight"].contiguous() for n in layers]
        self.biases = [state[f"{n}.bias"].unsqueeze(2).contiguous() for n in layers]

    def parameters(self) -> list[torch.Tensor]:
        return self.weights + self.biases

    def forward(self, x: torch.Tensor, shared: bool = False) -> list[torch.Tensor]:
        """Feature-major activations [H_0ᵀ, …, H_{L-1}ᵀ, Z_Lᵀ] for per-model inputs x (B, batch, ...),
        or for inputs every model sees, x (batch, ...) with `shared` (one matmul, x never copied B times)."""
        h = [x.flatten(1).t() if shared else x.flatten(2).transpose(1, 2)]
        for W, b in zip(self.weights, self.biases):
            z = torch.baddbmm(b, W, h[-1]) if h[-1].dim() == 3 else torch.matmul(W, h[-1]).add_(b)
            h.append(z.clamp_(min=0) if len(h) < len(self.weights) else z)
        return h

    @torch.no_grad()
    def logits(self, x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """Logits (B, N, k) of every model on the shared inputs x (N, ...), in chunks of points."""
        return torch.cat([self.forward(xb, shared=True)[-1].transpose(1, 2) for xb in x.split(chunk)], dim=1)

    def gradients(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                  label_smoothing: float) -> list[torch.Tensor]:
        """∂loss/∂θ for inputs x (B, batch, d), labels y (B, batch) and slot weights w (B, batch)
        (1/|batch| on real slots, 0 on padding), in the order of `parameters()`."""
        *h, z = self.forward(x)
        grad_z = torch.softmax(z, dim=1)
        grad_z.scatter_add_(1, y.unsqueeze(1), torch.full_like(y, label_smoothing - 1, dtype=grad_z.dtype).unsqueeze(1))
        if label_smoothing:
            grad_z.sub_(label_smoothing / grad_z.shape[1])
        grad_z.mul_(w.unsqueeze(1))
        return self.backward(h, grad_z)

    def backward(self, h: list[torch.Tensor], grad_z: torch.Tensor, first: int = 0) -> list[torch.Tensor]:
        """[∂W_l] + [∂b_l] of layers l ≥ `first` (0-based) given the activations h = forward(x)[:-1] and
        ∂loss/∂Z_Lᵀ (B, k, batch); layers below `first` get none (and cost nothing)."""
        grad_w, grad_b = [], []
        for layer in range(len(self.weights) - 1, first - 1, -1):
            grad_w.append(torch.bmm(grad_z, h[layer].transpose(1, 2)))
            grad_b.append(grad_z.sum(2, keepdim=True))
            if layer > first:  # ReLU's backward, exactly as autograd computes it
                grad_z = torch.ops.aten.threshold_backward(torch.bmm(self.weights[layer].transpose(1, 2), grad_z),
                                                           h[layer], 0)
        return grad_w[::-1] + grad_b[::-1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Stacked state in `nn.Linear`'s layout: weight (B, out, in), bias (B, out)."""
        state = {}
        for name, W, b in zip(self.layers, self.weights, self.biases):
            state[f"{name}.weight"] = W
            state[f"{name}.bias"] = b.squeeze(2)
        return state
