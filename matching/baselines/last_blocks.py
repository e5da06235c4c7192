"""EU-k and CF-k (Goel et al., 2022, "Towards adversarial evaluation of machine unlearning"):
only the last k blocks change, trained on R = S∖F; every other weight and buffer stays bit-identical.

EU-k (exact unlearning of the last k) re-initialises those blocks (each module's own default init,
drawn from the model's seed) and trains them on R; CF-k (catastrophic forgetting of the last k)
fine-tunes them on R from θ0. A block is a top-level module that holds parameters (`masks.blocks`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .config import SGDConfig, hp, require
from .finetune import retain_steps
from .loop import INIT, order_seed, run
from .masks import last_blocks
from .registry import register_stacked
from .stack import ModelStack, StackedResult, StackedTask


@dataclass(frozen=True)
class LastBlocksConfig(SGDConfig):
    """Which blocks train: the last k (on the digits MLP, k = 1 is the output layer of its two)."""
    k: int = hp(1, "number of last blocks (top-level modules with parameters) that train")

    def __post_init__(self):
        super().__post_init__()
        require(self.k >= 1, f"k {self.k} must be >= 1; e.g. --set k=1")


@dataclass(frozen=True)
class EUkConfig(LastBlocksConfig):
    """Defaults: a re-initialised block is trained from scratch, so 10 epochs at lr 0.05 (on digits,
    half the recipe's epochs at half its peak lr); Goel et al. train it with the original recipe."""
    lr: float = hp(0.05, "SGD learning rate")
    epochs: int = hp(10, "passes over S∖F")


@dataclass(frozen=True)
class CFkConfig(LastBlocksConfig):
    """Defaults: lr 0.01 and 5 epochs as `finetune`."""


def reinitialised(stack: ModelStack, names: list[str], seeds) -> ModelStack:
    """A copy of `stack` whose modules owning `names` are re-initialised (`reset_parameters`), model n from seeds[n].
    The draws are made on the CPU, whatever the stack's device, so a seed gives the same values everywhere."""
    out = stack.copy()
    prefixes = {n.rsplit(".", 1)[0] for n in names}
    keys = [k for k in {**out.params, **out.buffers} if k.rsplit(".", 1)[0] in prefixes]
    fresh = {k: [] for k in keys}
    for seed in seeds:
        model = copy.deepcopy(stack.base).to_empty(device="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(order_seed(seed, INIT))
            for prefix, module in model.named_modules():
                if prefix in prefixes and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        state = model.state_dict()
        for k in keys:
            fresh[k].append(state[k])
    for k in keys:
        target = out.params if k in out.params else out.buffers
        target[k] = torch.stack(fresh[k]).to(target[k].device, target[k].dtype)
    return out


@register_stacked("eu-k", EUkConfig)
def eu_k(task: StackedTask) -> StackedResult:
    """EU-k: re-initialise the last k blocks and train only them on S∖F."""
    names = last_blocks(task.stack, task.config.k)
    start = StackedTask(reinitialised(task.stack, names, task.seeds), task.data, task.forget_ids, task.config,
                        task.seeds)
    return run(start, retain_steps(start), trainable=dict.fromkeys(names))


@register_stacked("cf-k", CFkConfig)
def cf_k(task: StackedTask) -> StackedResult:
    """CF-k: fine-tune only the last k blocks on S∖F."""
    return run(task, retain_steps(task), trainable=dict.fromkeys(last_blocks(task.stack, task.config.k)))
