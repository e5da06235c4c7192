"""Output-channel localisation (Torkzadehmahani et al., TMLR 2025, "Improved localized machine unlearning
through the lens of memorization"): the parameters grouped into output channels, one score per channel,
and the channels taken greedily, highest score first, while they fit in a budget fraction of all parameters.

Channel c of a module is index c along the first axis of each of its own parameters: row c of a Linear
weight with bias c, output filter c of a Conv weight with its bias, entry c of a BatchNorm's weight and
bias. DEL's criticality of a channel is the mean of the top 10 % of |θ ⊙ ∇_θ CE(θ0; F)| over its entries;
Deepest and Shallowest score a channel by the depth of its module (input to output = registration order).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import MatchingError
from .stack import ModelStack


@dataclass(frozen=True)
class Channels:
    """A model's output channels: per module with parameters (input to output), its own parameter names
    and its number of channels; channel u of the model runs module by module, channel index ascending."""
    modules: tuple[tuple[tuple[str, ...], int], ...]

    @classmethod
    def of(cls, stack: ModelStack) -> "Channels":
        modules = []
        for prefix, module in stack.base.named_modules():
            names = tuple(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False))
            axes = {stack.params[n].shape[1] if stack.params[n].dim() > 1 else None for n in names}
            if None in axes:
                raise MatchingError(f"module {prefix or 'the model'} has a scalar parameter, which no output channel "
                                    "holds; use --set localisation=salloc")
            if len(axes) > 1:
                raise MatchingError(f"the parameters of module {prefix or 'the model'} have first axes "
                                    f"{sorted(axes)}, so it has no output channels; use --set localisation=salloc")
            if names:
                modules.append((names, axes.pop()))
        return cls(tuple(modules))

    def entries(self, values: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per module, its channels' entries (N, C, E) of `values` (name → (N, …)), parameters in order."""
        return [torch.cat([values[n].reshape(*values[n].shape[:2], -1) for n in names], 2) for names, _ in self.modules]

    def sizes(self, stack: ModelStack) -> torch.Tensor:
        """Parameters per channel (U,), on the stack's device."""
        return torch.cat([torch.full((c,), sum(stack.params[n][0, 0].numel() for n in names), dtype=torch.long,
                                     device=stack.device) for names, c in self.modules])

    def depth(self, stack: ModelStack) -> torch.Tensor:
        """The module index (0 = first) of each channel, for every model of `stack` (N, U), on its device."""
        depth = torch.cat([torch.full((c,), float(i), device=stack.device) for i, (_, c) in enumerate(self.modules)])
        return depth.expand(stack.size, -1)

    def mask(self, chosen: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The entry masks (name → bool, shaped as `params`' (N, …)) of the chosen channels (N, U)."""
        out = {}
        for (names, _), block in zip(self.modules, chosen.split([c for _, c in self.modules], dim=1)):
            for n in names:
                out[n] = block.view(*block.shape, *[1] * (params[n].dim() - 2)).expand_as(params[n]).clone()
        return out


def criticality(stack: ModelStack, grads: dict[str, torch.Tensor], top: float = 0.1) -> torch.Tensor:
    """DEL's criticality (N, U): per channel, the mean of its ⌈top·E⌉ largest |θ ⊙ g| over its E entries,
    g = ∇_θ CE on F (`masks.forget_gradients`)."""
    weighted = {k: (stack.params[k] * g).abs() for k, g in grads.items()}
    return torch.cat([e.topk(math.ceil(top * e.shape[2]), dim=2).values.mean(2)
                      for e in Channels.of(stack).entries(weighted)], dim=1)


def greedy_channels(scores: torch.Tensor, sizes: torch.Tensor, budget: float) -> torch.Tensor:
    """The channels (N, U bool) taken highest score first (ties: channel order) while their parameters
    add up to at most `budget` of all; the first channel that would pass the budget ends the selection."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    taken = sizes[order].cumsum(1) <= budget * sizes.sum()
    return torch.zeros_like(taken).scatter(1, order, taken)


def channel_mask(stack: ModelStack, scores: torch.Tensor, budget: float) -> dict[str, torch.Tensor]:
    """The `trainable` map of the channels `greedy_channels` takes by `scores` (N, U) within `budget`."""
    channels = Channels.of(stack)
    return channels.mask(greedy_channels(scores, channels.sizes(stack), budget), stack.params)
