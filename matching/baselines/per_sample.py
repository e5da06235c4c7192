"""The matrix G (m × P per model) of per-sample gradients g_j = ∇_θ CE(f_θ(x_j), y_j) of every model of a
stack, used through the products SSD's and IU's Fishers need: Σ_j g_j², G Gᵀ, G v and Gᵀ c.

Model n takes its own points (row n of an (N, m) index tensor); gradients are taken in eval mode, so no
BatchNorm statistic is used or moved. Two forms, the same products:
- `ChainGradients`, for a Flatten → Linear → ReLU → … → Linear chain, never forms G: layer l's part of g_j
  is (δ_j a_jᵀ, δ_j) with a_j the layer's input and δ_j = ∂ℓ_j/∂(its output), so e.g.
  g_i·g_j = Σ_l (δ_i·δ_j)(a_i·a_j + 1) and Σ_j (δ_j a_jᵀ)² = (δ²)ᵀ a²;
- `SampleGradients`, for any other model, forms G in memory-bounded chunks (N, b, P) with `torch.func`
  (vmap over models of vmap over points of grad).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from attribution.grouped_mlp import GroupedMLP, linear_chain

from .stack import ModelStack

CHUNK_FLOATS = 2 ** 22  # floats (16 MiB at float32) of G held at once on a CPU (larger chunks are slower there)
ACCELERATOR_SCALE = 64  # on a GPU, blocks this many times larger: there one large batched op beats many small ones


def block_floats(floats: int, device) -> int:
    """A block budget tuned on a CPU (`floats`), scaled by `ACCELERATOR_SCALE` on any other device."""
    return floats if torch.device(device).type == "cpu" else floats * ACCELERATOR_SCALE


class SampleGradients:
    """G of the points `idx` (N, m) of training inputs x, labels y, in chunks of points."""

    def __init__(self, stack: ModelStack, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        self.stack, self.x, self.y, self.idx = stack, x, y, idx
        n_params = sum(v[0].numel() for v in stack.params.values())
        step = max(1, block_floats(CHUNK_FLOATS, stack.device) // (stack.size * n_params))
        self.slices = [slice(s, min(s + step, idx.shape[1])) for s in range(0, idx.shape[1], step)]
        self._only = None  # the single chunk, kept when all points fit in one
        self.computed = 0  # per-sample gradients computed per model so far (a chunk may be recomputed)

    def chunk(self, i: int) -> torch.Tensor:
        """Gradients (N, b, P) of the points of chunk i (`self.slices[i]`)."""
        if self._only is not None:
            return self._only
        base = self.stack.base.eval()

        def loss(params, buffers, x, y):  # one model, one point
            return F.cross_entropy(functional_call(base, (params, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))

        idx = self.idx[:, self.slices[i]].to(self.stack.device)
        x, y = self.x.to(self.stack.device)[idx], self.y.to(self.stack.device)[idx]
        grads = vmap(vmap(grad(loss), in_dims=(None, None, 0, 0)))(self.stack.params, self.stack.buffers, x, y)
        out = torch.cat([g.flatten(2) for g in grads.values()], dim=2)
        self.computed += idx.shape[1]
        if len(self.slices) == 1:
            self._only = out
        return out

    def chunks(self):
        """(slice, gradients (N, b, P)) of every chunk in order."""
        return ((s, self.chunk(i)) for i, s in enumerate(self.slices))

    def squares(self) -> torch.Tensor:
        """Σ_j g_j² (N, P)."""
        return sum(g.square().sum(1) for _, g in self.chunks())

    def gram(self) -> torch.Tensor:
        """G Gᵀ (N, m, m), block by block (chunk b is recomputed for each a < b unless all fit in one)."""
        n, m = self.idx.shape
        out = None
        for a, sa in enumerate(self.slices):
            ga = self.chunk(a)
            out = ga.new_zeros(n, m, m) if out is None else out
            for b in range(a, len(self.slices)):
                block = torch.bmm(ga, (ga if b == a else self.chunk(b)).transpose(1, 2))
                out[:, sa, self.slices[b]] = block
                out[:, self.slices[b], sa] = block.transpose(1, 2)
        return out

    def times(self, v: torch.Tensor) -> torch.Tensor:
        """G v (N, m) for v (N, P)."""
        return torch.cat([torch.bmm(g, v.unsqueeze(2)).squeeze(2) for _, g in self.chunks()], dim=1)

    def transpose_times(self, c: torch.Tensor) -> torch.Tensor:
        """Gᵀ c (N, P) for c (N, m)."""
        return sum(torch.bmm(c[:, s].unsqueeze(1), g).squeeze(1) for s, g in self.chunks())


class ChainGradients:
    """G of the points `idx` (N, m) for a linear chain, held as its factors a_j, δ_j per layer, feature-major
    (a: (N, in, m), δ: (N, out, m)). Points shared by every model (all rows of idx equal, as SSD's) keep the
    first layer's input once, a: (in, m), so that its products are one matmul over all models."""

    def __init__(self, stack: ModelStack, layers: list[str], x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        self.stack, self.layers, self.computed = stack, layers, idx.shape[1]
        idx = idx.to(stack.device)
        shared = bool((idx == idx[:1]).all())
        points = idx[0] if shared else idx
        chain = GroupedMLP({k: v.detach() for k, v in stack.params.items()}, layers)
        *self.inputs, z = chain.forward(x.to(stack.device)[points], shared=shared)
        delta = torch.softmax(z, dim=1)  # ∂CE_j/∂z_j = softmax(z_j) − onehot(y_j)
        delta.scatter_add_(1, y.to(stack.device)[idx].unsqueeze(1), -torch.ones_like(delta[:, :1]))
        self.deltas = [delta]
        for layer in range(len(layers) - 1, 0, -1):  # δ_{l-1} = W_lᵀ δ_l ⊙ [z_{l-1} > 0]
            weight = chain.weights[layer].transpose(1, 2)
            self.deltas.insert(0, torch.ops.aten.threshold_backward(torch.bmm(weight, self.deltas[0]),
                                                                    self.inputs[layer], 0))

    def _flat(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([parts[k].flatten(1) for k in self.stack.params], dim=1)

    def _layers(self):
        """(name, a (N, in, m) or shared (in, m), δ (N, out, m)) per layer."""
        return zip(self.layers, self.inputs, self.deltas)

    def squares(self) -> torch.Tensor:
        parts = {}
        for name, a, d in self._layers():
            parts[f"{name}.weight"] = torch.matmul(d.square(), a.square().transpose(-1, -2))
            parts[f"{name}.bias"] = d.square().sum(2)
        return self._flat(parts)

    def gram(self) -> torch.Tensor:
        out = 0
        for _, a, d in self._layers():  # in place: the m × m products of a stack are large
            out = torch.bmm(d.transpose(1, 2), d).mul_(torch.matmul(a.transpose(-1, -2), a).add_(1)).add_(out)
        return out

    def times(self, v: torch.Tensor) -> torch.Tensor:
        p = unflatten(self.stack, v)
        return sum((d * (torch.matmul(p[f"{name}.weight"], a) + p[f"{name}.bias"].unsqueeze(2))).sum(1)
                   for name, a, d in self._layers())

    def transpose_times(self, c: torch.Tensor) -> torch.Tensor:
        parts = {}
        for name, a, d in self._layers():
            dc = d * c.unsqueeze(1)
            parts[f"{name}.weight"] = torch.matmul(dc, a.transpose(-1, -2))
            parts[f"{name}.bias"] = dc.sum(2)
        return self._flat(parts)


def gradients(stack: ModelStack, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
    """G of the points idx (N, m): factored for a linear chain, else in chunks (the same products)."""
    layers = linear_chain(stack.base)
    return SampleGradients(stack, x, y, idx) if layers is None else ChainGradients(stack, layers, x, y, idx)


def squares(stack: ModelStack, x: torch.Tensor, y: torch.Tensor, ids) -> torch.Tensor:
    """Σ_{j∈ids} g_j² (N, P) over points every model shares: for a chain a chunk of points at a time, each
    chunk's factors (N · Σ_l (in_l + out_l) floats a point) within `block_floats(CHUNK_FLOATS)`."""
    layers = linear_chain(stack.base)
    if layers is None:  # SampleGradients holds its own chunks
        return gradients(stack, x, y, shared_points(ids, stack.size)).squares()
    width = sum(sum(stack.params[f"{name}.weight"].shape[1:]) for name in layers)
    step = max(1, block_floats(CHUNK_FLOATS, stack.device) // (stack.size * width))
    ids = torch.as_tensor(ids, dtype=torch.long)
    return sum(ChainGradients(stack, layers, x, y, shared_points(ids[s:s + step], stack.size)).squares()
               for s in range(0, len(ids), step))


def shared_points(ids, n_models: int) -> torch.Tensor:
    """The same points for every model: an (N, m) index tensor of `ids`."""
    return torch.as_tensor(ids, dtype=torch.long).unsqueeze(0).expand(n_models, -1)


def unflatten(stack: ModelStack, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a flat (N, P) vector into the stack's parameter shapes (N, …)."""
    sizes = [v[0].numel() for v in stack.params.values()]
    return {k: part.view_as(v) for (k, v), part in zip(stack.params.items(), flat.split(sizes, dim=1))}


def flatten(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The stack's parameters as one (N, P) tensor, in the stack's order."""
    return torch.cat([v.flatten(1) for v in params.values()], dim=1)
