"""Retrain: the exact oracle A(S∖F) — a fresh initialisation and data order drawn from a new seed,
trained on S∖F with the recipe θ0 was trained with (`attribution.engine.train_batched`, all N at once)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attribution.engine import train_batched

from ..errors import MatchingError
from .config import hp, require
from .loop import order_seed
from .registry import register_stacked
from .stack import ModelStack, StackedResult, StackedTask

RETRAIN_STREAM = 7  # the trainer's seed is derived from (seed, this), never θ0's own training seed


@dataclass(frozen=True)
class RetrainConfig:
    """Retraining from scratch (the oracle of every unlearning paper); the recipe is the model's own."""
    seed: int = hp(0, "the new model's seed (init and data order derive from it, not from θ0's seed)")
    epochs: int = hp(0, "epochs to train; 0 keeps the recipe's (the one-cycle peak scales with them)")

    def __post_init__(self):
        require(self.epochs >= 0, f"epochs {self.epochs} must be >= 0; 0 keeps the recipe's epochs")

    def to_dict(self) -> dict:
        return {"seed": self.seed, "epochs": self.epochs}


@register_stacked("retrain", RetrainConfig)
def retrain(task: StackedTask) -> StackedResult:
    """Retrain: fresh init with a new seed, trained on S∖F with the dataset's recipe."""
    if task.model_name is None or task.recipe is None:
        raise MatchingError("retrain needs the model's name and training recipe; pass --store, or a model file "
                            "whose sidecar names them")
    recipe = task.recipe.with_epochs(task.config.epochs) if task.config.epochs else task.recipe
    masks = np.ones((len(task.seeds), task.data.n_train), dtype=bool)
    masks[:, task.forget_ids] = False
    seeds = [order_seed(s, RETRAIN_STREAM) for s in task.seeds]
    n_retain = int(masks[0].sum())
    result = train_batched(task.model_name, task.data, recipe, seeds, masks, device=task.stack.device)
    params = {k: v for k, v in result.state.items() if k in task.stack.params}
    buffers = {k: v for k, v in result.state.items() if k not in params}
    return StackedResult(ModelStack(task.stack.base, params, buffers),
                         {"steps": recipe.epochs * -(-n_retain // recipe.batch_size),
                          "sample_grads": recipe.epochs * n_retain})
