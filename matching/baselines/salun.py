"""SalUn (Fan et al., ICLR 2024): Random Label restricted to the salient weights.

The saliency mask keeps the top `mask_fraction` of the weights by |∇_θ CE(θ0; F)| (`masks.saliency_mask`);
then θ_u = m ⊙ (θ0 + Δθ) + (1 − m) ⊙ θ0 with Δθ from Random Label. The weights outside the mask are
restored after every step, so neither weight decay nor momentum moves them (one public reimplementation
multiplies the gradient by m and lets weight decay move the frozen weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import hp, require
from .loop import run
from .masks import saliency_mask
from .random_label import RandomLabelConfig, relabelled_steps
from .registry import register_stacked
from .stack import StackedResult, StackedTask


@dataclass(frozen=True)
class SalUnConfig(RandomLabelConfig):
    """Defaults: mask fraction 0.5 and lr 0.013 as SalUn's CIFAR-10 example (10 epochs); 5 epochs on digits."""
    lr: float = hp(0.013, "SGD learning rate")
    mask_fraction: float = hp(0.5, "fraction of the weights, by |∇ CE on F| at θ0, that may move")

    def __post_init__(self):
        super().__post_init__()
        require(0 < self.mask_fraction <= 1, f"mask_fraction {self.mask_fraction} must lie in (0, 1]; "
                                              "e.g. --set mask_fraction=0.5")


@register_stacked("salun", SalUnConfig)
def salun(task: StackedTask) -> StackedResult:
    """SalUn: saliency mask (top fraction of |∇CE_F| at θ0), then Random Label on the masked weights only."""
    forget = torch.as_tensor(task.forget_ids, dtype=torch.long)
    mask = saliency_mask(task.stack, task.data.x_train[forget].to(task.stack.device),
                         task.data.y_train[forget].to(task.stack.device), task.config.mask_fraction)
    return run(task, relabelled_steps(task), trainable=mask, extra_grads=len(forget))
