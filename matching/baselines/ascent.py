"""Gradient ascent on the forget set: GA / NegGrad (−CE on F) and NegGrad+ (α·CE_R − (1−α)·CE_F).

GA follows Thudi et al. (2022) / the GA baseline of Jia et al. (2023); NegGrad+ is Kurmanji et al.'s
(NeurIPS 2023, SCRUB paper) variant that descends on R while ascending on F: each step pairs a retain
minibatch with a forget minibatch (F cycled), for `epochs` passes over R.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import SGDConfig, hp, require
from .loop import CE, FORGET, RETAIN, Step, cycled_batches, epoch_batches, run
from .registry import register_stacked
from .stack import StackedResult, StackedTask


@dataclass(frozen=True)
class GAConfig(SGDConfig):
    """Defaults: Jia et al.'s GA script takes 5 epochs at lr 1e-4 over |F| = 4,500 CIFAR-10 points
    (≈ 35 steps of batch 128); a digits F of 50 is one step an epoch, so 5 epochs at lr 0.01."""


@dataclass(frozen=True)
class NegGradPlusConfig(SGDConfig):
    """Defaults: lr 0.01 and 5 epochs over R as `finetune`; α = 0.95 weighs the retain term (Kurmanji
    et al. tune α per setting; the digits sweep of the comparison reports it)."""
    alpha: float = hp(0.95, "α: weight of CE on R; 1 − α weighs the ascent on F")

    def __post_init__(self):
        super().__post_init__()
        require(0 <= self.alpha <= 1, f"alpha {self.alpha} must lie in [0, 1]; e.g. --set alpha=0.95")


@register_stacked("ga", GAConfig)
def gradient_ascent(task: StackedTask) -> StackedResult:
    """GA / NegGrad: −CE on F (gradient ascent on the forget set)."""
    y, c = task.data.y_train, task.config
    epochs = epoch_batches(task.forget_ids, c.epochs, c.batch_size, task.seeds, FORGET)
    return run(task, [Step((CE(idx, y[idx], -1.0),)) for batches in epochs for idx in batches])


def neggrad_plus_steps(task: StackedTask) -> list[Step]:
    """α·CE on S∖F − (1−α)·CE on F, one retain and one forget minibatch a step, `epochs` passes over S∖F."""
    y, c = task.data.y_train, task.config
    retain = [idx for batches in epoch_batches(task.retain_ids(), c.epochs, c.batch_size, task.seeds, RETAIN)
              for idx in batches]
    forget = cycled_batches(task.forget_ids, len(retain), c.batch_size, task.seeds, FORGET)
    return [Step((CE(r, y[r], c.alpha), CE(f, y[f], c.alpha - 1))) for r, f in zip(retain, forget)]


@register_stacked("neggrad+", NegGradPlusConfig)
def neggrad_plus(task: StackedTask) -> StackedResult:
    """NegGrad+: α·CE on S∖F − (1−α)·CE on F, one retain and one forget minibatch a step."""
    return run(task, neggrad_plus_steps(task))
