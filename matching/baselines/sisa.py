"""SISA unlearning (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021): exact unlearning of a model
trained with `dmm train --sisa SHARDS,SLICES` (`attribution.sisa`).

A request with F retrains only the shards that hold an id of F not forgotten before. Shard s restarts
from its checkpoint after slice r*−1, r* the first of its slices holding such an id (from the
initialisation when r* = 1), and retrains stages r*..R on its slices without F, each stage with the seed,
recipe and epochs it was trained with; every other shard and every earlier checkpoint stays
bit-identical. The result is the ensemble SISA trains on S∖F with the same seeds.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch

from attribution.sisa import SisaEnsemble, train_stages

from ..errors import MatchingError
from ..methods import UnlearnTask, Unlearned, register_method
from .config import hp, require
from .registry import training_of


@dataclass(frozen=True)
class SisaConfig:
    """SISA has no knob at unlearning time: its shards, slices and stages were fixed at training time.
    `shards` × `slices` is the shape `dmm evaluate` trains its originals with (training time; a request
    keeps the model's own); 5 × 4 lies in the paper's range (S = 5–20 shards, few slices)."""
    training_time: ClassVar[tuple[str, ...]] = ("shards", "slices")
    seed: int = hp(0, "unused: retrained stages reuse their training seeds (every method takes a seed)")
    shards: int = hp(5, "training time: shards S of the ensemble (`dmm train --sisa S,R`); a request keeps the model's")
    slices: int = hp(4, "training time: slices R per shard (`dmm train --sisa S,R`); a request keeps the model's")

    def __post_init__(self):
        require(self.shards >= 1 and self.slices >= 1,
                f"shards {self.shards} and slices {self.slices} must be >= 1; e.g. shards=5, slices=4")

    def to_dict(self) -> dict:
        return asdict(self)


def restart_slices(ensemble: SisaEnsemble, forget_ids: np.ndarray) -> dict[int, int]:
    """{shard s: r*} (0-based) for every shard holding an id of F not yet forgotten: its first such slice."""
    new = torch.as_tensor(np.asarray(forget_ids, dtype=np.int64))
    new = new[~ensemble.forgotten.cpu()[new]]
    first: dict[int, int] = {}
    for slot in sorted(set(ensemble.slot.cpu()[new].tolist())):
        shard, r = divmod(slot, ensemble.slices)
        first.setdefault(shard, r)  # slots ascend: the first one kept is the shard's lowest slice
    return first


@register_method("sisa", SisaConfig, needs=("training records",))
def sisa(task: UnlearnTask) -> Unlearned:
    """SISA: retrain only the shards that held F, each from its last checkpoint before F's first slice."""
    if not isinstance(task.model, SisaEnsemble):
        raise MatchingError("sisa needs a model trained with `dmm train --sisa SHARDS,SLICES` (its shard and "
                            "slice checkpoints); this one was trained without them, so train one that way")
    model_name, recipe = training_of(task)
    if model_name is None or recipe is None:
        raise MatchingError("sisa needs the model's name and training recipe; pass --store, or a model file "
                            "whose sidecar names them")
    start = time.perf_counter()
    ensemble = copy.deepcopy(task.model)
    first = restart_slices(ensemble, task.forget_ids)
    ensemble.forgotten[torch.as_tensor(np.asarray(task.forget_ids, dtype=np.int64))] = True
    stats = train_stages(ensemble, model_name, task.data, recipe, first)
    return Unlearned(ensemble.eval(), {**stats, "seconds": time.perf_counter() - start})
