"""Training recipes: everything that, together with a seed and a subset, determines A(S').

The learning-rate schedules are functions of the step index t (0-based) and the model's own
total number of steps T, so models trained on subsets of unequal size each follow their own schedule.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from .errors import DmmError


class RecipeError(DmmError):
    """A recipe field with an unusable value; the message names the fix."""


SCHEDULES = ("constant", "cosine", "onecycle")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Recipe:
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    peak_epoch: float = 2.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise RecipeError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise RecipeError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise RecipeError("epochs and batch_size must be >= 1; raise them")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            raise RecipeError("need lr > 0, weight_decay >= 0 and 0 <= label_smoothing < 1; fix the recipe")
        if self.schedule == "onecycle" and not 0 < self.peak_epoch < self.epochs:
            raise RecipeError(f"peak_epoch {self.peak_epoch} must lie in (0, epochs={self.epochs}); move it")
        object.__setattr__(self, "betas", tuple(self.betas))

    def lr_factor(self, step, total_steps):
        """Multiplier of `lr` at step t of T: constant 1, cosine to 0, or triangular 0 → 1 at the peak → 0.

        Scalars give a float; numpy arrays (broadcast together) give an array of factors.
        """
        step, total = np.asarray(step, dtype=np.float64), np.asarray(total_steps, dtype=np.float64)
        if self.schedule == "constant":
            factor = np.ones(np.broadcast(step, total).shape)
        elif self.schedule == "cosine":
            factor = 0.5 * (1.0 + np.cos(np.pi * step / total))
        else:
            peak = self.peak_epoch / self.epochs * total
            factor = np.where(step < peak, step / peak, np.maximum(0.0, (total - step) / (total - peak)))
        return float(factor) if factor.ndim == 0 else factor

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise RecipeError(f"unknown recipe fields {sorted(unknown)}; use {sorted(known)}")
        return cls(**d)

    def with_(self, **changes) -> "Recipe":
        return replace(self, **changes)


DEFAULT_RECIPES = {
    "digits": Recipe(epochs=20, batch_size=64, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, schedule="onecycle", peak_epoch=2),
    "mnist1d": Recipe(epochs=30, batch_size=128, optimizer="adam", lr=3e-3, weight_decay=0.0,
                      schedule="cosine"),
    # the datamodels/KLoM ResNet-9 recipe: SGD, triangular one-cycle, label smoothing 0.1
    "cifar10": Recipe(epochs=24, batch_size=512, optimizer="sgd", lr=0.5, momentum=0.9, nesterov=False,
                      weight_decay=5e-4, schedule="onecycle", peak_epoch=5, label_smoothing=0.1),
}


def default_recipe(dataset_name: str) -> Recipe:
    return DEFAULT_RECIPES.get(dataset_name, DEFAULT_RECIPES["digits"])
