"""SCRUB (Kurmanji et al., NeurIPS 2023, "Towards unbounded machine unlearning").

The teacher is the original model θ0, frozen; the student starts at θ0 and is the only one updated.
Each epoch (of `epochs`) is, for the first `max_epochs` epochs, a max-step pass over F,
    min_θ  −KL(teacher ‖ student)                      (move away from θ0 on F),
then a min-step pass over R,
    min_θ  γ·CE(student) + α·KL(teacher ‖ student)      (stay close to θ0 on R),
KL at temperature T scaled by T² (SCRUB's `DistillKL`). The teacher's logits are computed once: it never
changes (one public benchmark steps the teacher too).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SGDConfig, hp, require
from .loop import CE, FORGET, KL, RETAIN, Step, epoch_batches, run
from .registry import register_stacked
from .stack import StackedResult, StackedTask


@dataclass(frozen=True)
class ScrubConfig(SGDConfig):
    """Defaults: α = 0.001, γ = 0.99, T = 4, 3 max-epochs of 5, momentum 0.9, weight decay 5e-4 and forget
    batch 32 as SCRUB's small-scale CIFAR setting (lr 5e-4 there; lr 0.005 on digits, whose F is one or
    two batches an epoch)."""
    lr: float = hp(0.005, "SGD learning rate")
    max_epochs: int = hp(3, "epochs that start with a max-step pass over F (SCRUB's msteps)")
    alpha: float = hp(0.001, "α: weight of KL(teacher‖student) in the min-steps on R")
    gamma: float = hp(0.99, "γ: weight of CE in the min-steps on R")
    temperature: float = hp(4.0, "T: distillation temperature (KL on softmax(z/T), scaled by T²)")
    forget_batch_size: int = hp(32, "minibatch size of the max-steps on F")

    def __post_init__(self):
        super().__post_init__()
        require(0 <= self.max_epochs <= self.epochs, f"max_epochs {self.max_epochs} must lie in 0..epochs="
                                                     f"{self.epochs}; e.g. --set max_epochs=3")
        require(self.alpha >= 0 and self.gamma >= 0, f"alpha {self.alpha} and gamma {self.gamma} must be >= 0")
        require(self.temperature > 0, f"temperature {self.temperature} must be > 0; e.g. --set temperature=4")
        require(self.forget_batch_size >= 1, f"forget_batch_size {self.forget_batch_size} must be >= 1")


@register_stacked("scrub", ScrubConfig)
def scrub(task: StackedTask) -> StackedResult:
    """SCRUB: max-steps on F (−KL(teacher‖student)), min-steps on S∖F (γ·CE + α·KL); only the student moves."""
    c, y = task.config, task.data.y_train
    with torch.no_grad():
        teacher = task.stack.logits(task.data.x_train).cpu()  # (N, n_train, k) of the frozen θ0
    forget = epoch_batches(task.forget_ids, c.max_epochs, c.forget_batch_size, task.seeds, FORGET)
    retain = epoch_batches(task.retain_ids(), c.epochs, c.batch_size, task.seeds, RETAIN)

    def kl(idx, weight):
        return KL(idx, teacher.gather(1, idx.unsqueeze(2).expand(-1, -1, teacher.shape[2])), weight, c.temperature)

    steps = []
    for epoch in range(c.epochs):
        steps += [Step((kl(idx, -1.0),)) for idx in (forget[epoch] if epoch < c.max_epochs else [])]
        steps += [Step((CE(idx, y[idx], c.gamma), kl(idx, c.alpha))) for idx in retain[epoch]]
    return run(task, steps)
