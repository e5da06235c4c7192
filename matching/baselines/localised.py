"""DEL, Deletion by Example Localization (Torkzadehmahani et al., TMLR 2025, "Improved localized machine
unlearning through the lens of memorization"), and the grid of localised unlearning it is compared in:
a localisation picks the parameters F depends on most, then an algorithm moves only those.

Localisations (within `budget`, a fraction of all parameters): `del`, output channels by criticality
(mean of the top 10 % of |θ ⊙ ∇CE_F(θ0)|, `channels.criticality`); `deepest` / `shallowest`, the last /
first layers' channels; `salloc`, the top weights by |∇CE_F(θ0)| (SalUn's mask, `masks.saliency_mask`).
Algorithms: `reset-finetune` (DEL's) re-initialises the masked parameters (each module's default init,
drawn from the model's seed) and trains them with CE on S∖F; `random-label` and `neggrad+` train them from
θ0 (`random_label.relabelled_steps`, `ascent.neggrad_plus_steps`). Every other weight stays bit-identical,
weight decay and momentum included (`loop.descend`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .ascent import NegGradPlusConfig, neggrad_plus_steps
from .channels import Channels, channel_mask, criticality
from .config import hp, require
from .finetune import retain_steps
from .last_blocks import reinitialised
from .loop import run
from .masks import forget_gradients, saliency_mask
from .random_label import relabelled_steps
from .registry import register_stacked
from .stack import ModelStack, StackedResult, StackedTask

LOCALISATIONS = {  # name -> (stack, F's inputs, F's labels, budget) -> trainable map
    "del": lambda stack, x, y, budget: channel_mask(stack, criticality(stack, forget_gradients(stack, x, y)), budget),
    "deepest": lambda stack, x, y, budget: channel_mask(stack, Channels.of(stack).depth(stack), budget),
    "shallowest": lambda stack, x, y, budget: channel_mask(stack, -Channels.of(stack).depth(stack), budget),
    "salloc": saliency_mask,
}
GRADIENT_FREE = ("deepest", "shallowest")
ALGORITHMS = {"reset-finetune": retain_steps, "random-label": relabelled_steps, "neggrad+": neggrad_plus_steps}


@dataclass(frozen=True)
class DELConfig(NegGradPlusConfig):
    """Defaults: DEL's CIFAR-10 run (30 epochs at lr 0.015, weight decay 0, after pre-training 30 epochs
    at lr 0.1; its cosine decay is left out) scaled to digits, whose recipe also peaks at lr 0.1: lr 0.015
    and weight decay 0 kept, 10 epochs (half the recipe's 20, as `eu-k`, which also re-initialises)."""
    lr: float = hp(0.015, "SGD learning rate")
    epochs: int = hp(10, "passes over the algorithm's data")
    weight_decay: float = hp(0.0, "coupled L2 weight decay, as torch.optim.SGD")
    localisation: str = hp("del", f"which parameters move: {', '.join(LOCALISATIONS)}")
    algorithm: str = hp("reset-finetune", f"how they move: {', '.join(ALGORITHMS)} (alpha: neggrad+'s)")
    budget: float = hp(0.3, "fraction of all parameters the localisation may pick")

    def __post_init__(self):
        super().__post_init__()
        require(self.localisation in LOCALISATIONS, f"localisation {self.localisation!r} is not one of "
                                                    f"{', '.join(LOCALISATIONS)}; e.g. --set localisation=del")
        require(self.algorithm in ALGORITHMS, f"algorithm {self.algorithm!r} is not one of {', '.join(ALGORITHMS)}; "
                                              "e.g. --set algorithm=reset-finetune")
        require(0 < self.budget <= 1, f"budget {self.budget} must lie in (0, 1]; e.g. --set budget=0.3")


def reset(stack: ModelStack, mask: dict[str, torch.Tensor], seeds) -> ModelStack:
    """`stack` with its masked entries re-initialised: taken from a fresh init of the whole model (each
    module's default, model n's from seeds[n]), so that a value does not depend on what else is masked."""
    fresh = reinitialised(stack, list(stack.params), seeds)
    out = stack.copy()
    for k, m in mask.items():
        out.params[k] = torch.where(m, fresh.params[k], stack.params[k])
    return out


def localisation(task: StackedTask) -> dict[str, torch.Tensor]:
    """The config's localisation on the task's models: name → bool mask (N, …) of the parameters that
    move (parameters that no model moves are left out, so their modules stay in eval mode)."""
    c, forget = task.config, torch.as_tensor(task.forget_ids, dtype=torch.long)
    device = task.stack.device
    mask = LOCALISATIONS[c.localisation](task.stack, task.data.x_train[forget].to(device),
                                         task.data.y_train[forget].to(device), c.budget)
    moving = {k: m for k, m in mask.items() if m.any()}
    require(bool(moving), f"budget {c.budget} holds no output channel of the model (the greediest pick is larger); "
                          "raise it, e.g. --set budget=0.3")
    return moving


@register_stacked("del", DELConfig)
def localised_unlearning(task: StackedTask) -> StackedResult:
    """DEL: reset the most critical output channels (top 10 % |θ ⊙ ∇CE_F| per channel, to a parameter budget)
    and fine-tune them on S∖F; other localisations (deepest, shallowest, salloc) and algorithms
    (random-label, neggrad+) by --set."""
    c = task.config
    mask = localisation(task)
    start = replace(task, stack=reset(task.stack, mask, task.seeds)) if c.algorithm == "reset-finetune" else task
    extra = 0 if c.localisation in GRADIENT_FREE else len(task.forget_ids)
    return run(start, ALGORITHMS[c.algorithm](start), trainable=mask, extra_grads=extra)
