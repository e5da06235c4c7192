"""Fine-tuning on the retain set R = S∖F: plain (catastrophic forgetting of F) and ℓ1-sparse.

`finetune` follows the FT baseline of Jia et al. (NeurIPS 2023, "Model sparsity can simplify machine
unlearning"): CE on R for a few epochs. `l1-sparse` is their ℓ1-sparse unlearning: CE_R(θ) + γ_t ‖θ‖₁
with γ_t = γ·(1 − t/T) decaying linearly over the epochs t = 0..T−1 (their best scheduler).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import SGDConfig, hp, require
from .loop import CE, RETAIN, Step, epoch_batches, run
from .registry import register_stacked
from .stack import StackedResult, StackedTask


@dataclass(frozen=True)
class FinetuneConfig(SGDConfig):
    """Defaults: lr 0.01 as Jia et al.'s FT script (10 epochs on CIFAR-10); 5 epochs on digits, a
    quarter of its 20-epoch recipe."""


@dataclass(frozen=True)
class L1SparseConfig(SGDConfig):
    """Defaults: γ = 1e-4, lr 0.01 as Jia et al.'s ℓ1-sparse script (10 epochs on CIFAR-10); 5 epochs on digits."""
    gamma: float = hp(1e-4, "γ: ℓ1 weight at the first epoch, decaying linearly to 0 over the epochs")

    def __post_init__(self):
        super().__post_init__()
        require(self.gamma >= 0, f"gamma {self.gamma} must be >= 0; e.g. --set gamma=1e-4")


def retain_steps(task: StackedTask, l1_schedule=lambda epoch: 0.0) -> list[Step]:
    """CE on R for `epochs` epochs; model n visits R in its own order."""
    y, c = task.data.y_train, task.config
    epochs = epoch_batches(task.retain_ids(), c.epochs, c.batch_size, task.seeds, RETAIN)
    return [Step((CE(idx, y[idx]),), l1_schedule(e)) for e, batches in enumerate(epochs) for idx in batches]


@register_stacked("finetune", FinetuneConfig)
def finetune(task: StackedTask) -> StackedResult:
    """Fine-tune: CE on the retain set S∖F."""
    return run(task, retain_steps(task))


@register_stacked("l1-sparse", L1SparseConfig)
def l1_sparse(task: StackedTask) -> StackedResult:
    """ℓ1-sparse: CE on S∖F + γ·(1 − t/T)·‖θ‖₁."""
    c = task.config
    return run(task, retain_steps(task, lambda epoch: c.gamma * (1 - epoch / c.epochs)))
