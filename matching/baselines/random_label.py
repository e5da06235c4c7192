"""Random Label (RL): F relabelled uniformly at random to a class ≠ its own, trained together with R.

As in Golatkar et al. (2020) / the RL baseline of Jia et al. (2023) and SalUn (Fan et al., ICLR 2024):
each forget point gets one wrong label y' = (y + u) mod k, u uniform on 1..k−1 (drawn once per model),
and the model is fine-tuned with CE on F ∪ R with those labels. SalUn runs the same loop restricted
to its saliency mask (`salun.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import SGDConfig
from .loop import CE, LABELS, RETAIN, Step, epoch_batches, order_seed, run
from .registry import register_stacked
from .stack import StackedResult, StackedTask


@dataclass(frozen=True)
class RandomLabelConfig(SGDConfig):
    """Defaults: lr 0.01 as Jia et al.'s RL script (10 epochs on CIFAR-10); 5 epochs on digits."""


def random_labels(task: StackedTask) -> torch.Tensor:
    """Labels (N, n_train): y on R; on F a class ≠ y, uniform, drawn from model n's seed."""
    y, k = task.data.y_train, task.data.num_classes
    labels = y.repeat(len(task.seeds), 1)
    forget = torch.as_tensor(task.forget_ids, dtype=torch.long)
    for n, seed in enumerate(task.seeds):
        shift = np.random.default_rng(order_seed(seed, LABELS)).integers(1, k, size=len(forget))
        labels[n, forget] = (y[forget] + torch.from_numpy(shift)) % k
    return labels


def relabelled_steps(task: StackedTask) -> list[Step]:
    """CE on F ∪ R = S with F's random labels, `epochs` passes in model n's own order."""
    c, labels = task.config, random_labels(task)
    epochs = epoch_batches(np.arange(task.data.n_train), c.epochs, c.batch_size, task.seeds, RETAIN)
    return [Step((CE(idx, labels.gather(1, idx)),)) for batches in epochs for idx in batches]


@register_stacked("random-label", RandomLabelConfig)
def random_label(task: StackedTask) -> StackedResult:
    """Random Label: F relabelled at random (≠ y), trained together with S∖F."""
    return run(task, relabelled_steps(task))
