"""Amnesiac unlearning (Graves, Nagisetty & Ganesh, AAAI 2021, "Amnesiac Machine Learning").

Training logs the update Δθ_t = θ_{t+1} − θ_t of every minibatch t and the ids it held (`dmm train
--record-updates`, `attribution.update_record`). To forget F, subtract the updates of the batches that
held an id of F, B_F = {t : batch t ∩ F ≠ ∅}:

    θ_u = θ_T − Σ_{t∈B_F} Δθ_t,

then repair with a little training on S∖F (`epochs`; Graves et al.'s code continues training on
the remaining data after the subtraction). A record kept with `--record-keep` holds only the top
fraction of each update per parameter tensor by |Δ| (the layer-wise partial amnesiac unlearning of
Gogineni & Nadimi 2024); the subtraction uses what it holds. Works on one model from its own record, so
it is not stacked; `dmm evaluate` trains its own recorded originals (`keep`, training time).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from attribution.update_record import UpdateRecord

from ..errors import MatchingError
from ..methods import UnlearnTask, Unlearned, register_method
from .config import SGDConfig, hp, require
from .finetune import retain_steps
from .loop import run
from .stack import ModelStack, StackedTask


@dataclass(frozen=True)
class AmnesiacConfig(SGDConfig):
    """Defaults: one repair epoch on S∖F with `finetune`'s SGD settings (not from the paper, which trains
    the repair with its training optimiser); `epochs=0` is the bare subtraction. `keep` is the record
    `dmm evaluate` trains its originals with (training time; a request reads the model's own record)."""
    training_time: ClassVar[tuple[str, ...]] = ("keep",)
    min_epochs: ClassVar[int] = 0
    epochs: int = hp(1, "repair: passes of SGD over S∖F after the subtraction (the paper's repair); 0: none")
    keep: float = hp(1.0, "training time: fraction of each update recorded per tensor (`dmm train --record-keep`)")

    def __post_init__(self):
        super().__post_init__()
        require(0 < self.keep <= 1, f"keep {self.keep} must lie in (0, 1]; 1 records every update whole")


@torch.no_grad()
def subtract(model: torch.nn.Module, update: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `model` with θ − update (float64 updates, each parameter rounded once to its dtype)."""
    out = copy.deepcopy(model)
    for name, p in out.named_parameters():
        p.copy_((p.double() - update[name].to(p.device)).to(p.dtype))
    return out


@register_method("amnesiac", AmnesiacConfig, needs=("training records",))
def amnesiac(task: UnlearnTask) -> Unlearned:
    """Amnesiac: θ − Σ of the recorded updates of the batches that held an id of F, then repair on S∖F."""
    start = time.perf_counter()
    if task.model_path is None:
        raise MatchingError("amnesiac reads the update record beside the model file; pass --model, a file "
                            "written by `dmm train --record-updates`")
    record = UpdateRecord.of_model(task.model_path)
    record.check_model(task.model, task.model_path)
    update, removed = record.forget_update(task.forget_ids)
    model = subtract(task.model, update)
    stats = {"batches_removed": removed, "record_steps": record.steps, "steps": 0, "sample_grads": 0}
    if task.config.epochs:
        repair = StackedTask(ModelStack.of([model]), task.data, task.forget_ids, task.config, (task.config.seed,))
        result = run(repair, retain_steps(repair))
        model = result.stack.module(0, like=task.model)
        stats.update(result.stats)
    return Unlearned(model.eval(), {**stats, "seconds": time.perf_counter() - start})
