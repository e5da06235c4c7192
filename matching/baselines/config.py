"""Hyperparameters shared by the gradient-based baselines: the SGD run every one of them makes.

Every field carries a one-line doc (`hp(default, doc)`), which `dmm methods` prints; a bad value is a
one-line `BaselineConfigError` naming the field and a value that works.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import ClassVar

from matching.errors import MatchingError


class BaselineConfigError(MatchingError):
    """A baseline hyperparameter with an unusable value; the message names the fix."""


def hp(default, doc: str):
    """A hyperparameter field: its default and the one line `dmm methods` prints for it."""
    return field(default=default, metadata={"doc": doc})


def field_docs(cls) -> list[tuple[str, str, object, str]]:
    """(name, type, default, doc) of every field of a config dataclass; doc is "" where none is given (the type of a
    None default is the field's annotation)."""
    return [(f.name, f.type if f.default is None else type(f.default).__name__, f.default, f.metadata.get("doc", ""))
            for f in fields(cls) if f.default is not MISSING]


def require(ok: bool, message: str) -> None:
    """Raise the one-line error `message` (problem and fix) unless `ok`."""
    if not ok:
        raise BaselineConfigError(message)


@dataclass(frozen=True)
class SGDConfig:
    """SGD with momentum and coupled weight decay (as `torch.optim.SGD`) at a constant learning rate,
    `epochs` passes over the method's data; model n of a stack draws its random choices from seed + n."""
    min_epochs: ClassVar[int] = 1
    lr: float = hp(0.01, "SGD learning rate")
    epochs: int = hp(5, "passes over the method's data")
    batch_size: int = hp(64, "minibatch size")
    momentum: float = hp(0.9, "SGD momentum")
    weight_decay: float = hp(5e-4, "coupled L2 weight decay, as torch.optim.SGD")
    seed: int = hp(0, "draws minibatch orders (and random labels, re-initialisations)")

    def __post_init__(self):
        require(self.lr > 0, f"lr {self.lr} must be > 0; e.g. --set lr=0.01")
        require(self.epochs >= self.min_epochs, f"epochs {self.epochs} must be >= {self.min_epochs}; e.g. --set epochs=5")
        require(self.batch_size >= 1, f"batch_size {self.batch_size} must be >= 1; e.g. --set batch_size=64")
        require(0 <= self.momentum < 1, f"momentum {self.momentum} must lie in [0, 1); e.g. --set momentum=0.9")
        require(self.weight_decay >= 0, f"weight_decay {self.weight_decay} must be >= 0; use 0 for none")

    def to_dict(self) -> dict:
        return asdict(self)
