"""SISA training (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021): Sharded, Isolated, Sliced,
Aggregated.

The training set is cut into S disjoint shards (a permutation drawn from the seed, cut into near-equal
parts) and each shard into R disjoint slices. Shard s's model is trained in R stages: stage r trains on
the union of slices 1..r for e' = max(1, round(2e/(R+1))) epochs (the paper's split:
Σ_r e'·r·|D_s|/R ≈ e·|D_s|, the cost of e epochs on the shard), starting from the checkpoint of stage
r−1 (stage 1 from the initialisation its seed draws), and a checkpoint is kept after every stage. Each
stage runs the recipe over its e' epochs with a fresh optimiser: what a stage computes depends only on
the slices it sees and its seed, so retraining the stages from the first slice that held F
(`train_stages`) gives exactly the model SISA trains on S∖F with the same seeds. The S shards of a
stage are trained at once (`train_batched`, stacked).

`SisaEnsemble` is the model: every checkpoint (S·R models), the plan and the forgotten ids, all in its
state dict, so one model file (with a `sisa` entry in its sidecar) holds everything a request needs.
"""
from __future__ import annotations

import argparse
import copy
import re

import numpy as np
import torch
from torch import nn

from .datasets import Dataset
from .engine import derive_seeds, train_batched
from .errors import DmmError
from .models import build_model
from .recipes import Recipe

PREDICTION_RULES = ("vote", "mean")


class SisaError(DmmError):
    """An unusable SISA shape or model file; the message names the fix."""


class SisaEnsemble(nn.Module):
    """S shard models with their slice checkpoints: `stages[s][r]` is shard s after stage r (0-based), the
    shard's model is `stages[s][-1]`. Buffers: `slot[i]` = s·R + r, the slice holding training id i;
    `forgotten[i]`, ids no stage may train on (unlearned or excluded); `seed`, from which the plan and
    the stage seeds derive.

    `forward` returns the mean of the shard models' logits (what `dmm predict`, KLoM and the margins
    read); `predict` returns labels by majority vote (the paper's aggregation) or by the mean logits.
    """

    def __init__(self, base: nn.Module, shards: int, slices: int, n_train: int, seed: int = 0):
        super().__init__()
        self.stages = nn.ModuleList(nn.ModuleList(copy.deepcopy(base) for _ in range(slices)) for _ in range(shards))
        self.requires_grad_(False)  # trained by `train_stages` only, never by a gradient through the ensemble
        self.register_buffer("slot", torch.zeros(n_train, dtype=torch.long))
        self.register_buffer("forgotten", torch.zeros(n_train, dtype=torch.bool))
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))

    @classmethod
    def like(cls, base: nn.Module, state: dict[str, torch.Tensor]) -> "SisaEnsemble":
        """An empty ensemble of `base` models shaped as the saved `state` (S and R read from its keys)."""
        stages = {tuple(map(int, m.groups())) for k in state if (m := re.match(r"stages\.(\d+)\.(\d+)\.", k))}
        if not stages or "slot" not in state:
            raise SisaError("the model file's sidecar names a SISA ensemble but its state holds none; "
                            "retrain it with `dmm train --sisa SHARDS,SLICES`")
        shards, slices = max(s for s, _ in stages) + 1, max(r for _, r in stages) + 1
        return cls(base, shards, slices, len(state["slot"]))

    @property
    def shards(self) -> int:
        return len(self.stages)

    @property
    def slices(self) -> int:
        return len(self.stages[0])

    def shard_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (S, b, k) of every shard model."""
        return torch.stack([shard[-1](x) for shard in self.stages])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shard_logits(x).mean(0)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, rule: str = "vote") -> torch.Tensor:
        """Labels (b,): the class most shard models predict (ties: the lowest class), or with rule="mean"
        the argmax of the mean logits."""
        if rule not in PREDICTION_RULES:
            raise SisaError(f"unknown prediction rule {rule!r}; use one of {', '.join(PREDICTION_RULES)}")
        logits = self.shard_logits(x)
        if rule == "mean":
            return logits.mean(0).argmax(-1)
        votes = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0)
        return votes.argmax(-1)  # torch.argmax returns the first maximum

    def manifest(self, recipe: Recipe) -> dict:
        """The sidecar's `sisa` entry (informative: the state itself holds the plan and checkpoints)."""
        return {"shards": self.shards, "slices": self.slices, "stage_epochs": stage_epochs(recipe.epochs, self.slices),
                "checkpoints": "stages.{shard}.{slice} in the model file", "predict": "vote; logits: shard mean"}


def parse_shape(text: str) -> tuple[int, int]:
    """`--sisa SHARDS,SLICES` as (S, R), both >= 1."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not SHARDS,SLICES of two integers >= 1; e.g. --sisa 5,4")
    return int(parts[0]), int(parts[1])


def stage_epochs(epochs: int, slices: int) -> int:
    """e' = max(1, round(2e/(R+1))): the epochs of each stage (Bourtoule et al., time analysis of slicing)."""
    return max(1, round(2 * epochs / (slices + 1)))


def sisa_plan(n_train: int, shards: int, slices: int, seed: int) -> torch.Tensor:
    """slot (n_train,): s·R + r for the slice r of shard s holding each training id."""
    if shards * slices > n_train:
        raise SisaError(f"{shards} shards × {slices} slices leave a slice of the {n_train} training points empty; "
                        "use fewer shards or slices")
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0])).permutation(n_train)
    slot = np.empty(n_train, dtype=np.int64)
    for s, shard in enumerate(np.array_split(order, shards)):
        for r, part in enumerate(np.array_split(shard, slices)):
            slot[part] = s * slices + r
    return torch.from_numpy(slot)


def stage_seed(seed: int, shard: int, stage: int) -> int:
    """The training seed of (shard, stage): its initialisation (stage 0) and data order derive from it."""
    return int(np.random.SeedSequence([int(seed), 1, shard, stage]).generate_state(1)[0])


def train_sisa(model_name: str, data: Dataset, recipe: Recipe, seed: int, shards: int, slices: int,
               excluded=(), device: str | torch.device = "cpu") -> tuple[SisaEnsemble, dict]:
    """Train the S×R stages of a SISA ensemble on S minus `excluded`; returns (ensemble, `train_stages` stats)."""
    base = build_model(model_name, data.input_shape, data.num_classes, 0)
    ensemble = SisaEnsemble(base, shards, slices, data.n_train, seed).to(device)
    ensemble.slot.copy_(sisa_plan(data.n_train, shards, slices, seed))
    ensemble.forgotten[torch.as_tensor(np.asarray(excluded, dtype=np.int64))] = True
    stats = train_stages(ensemble, model_name, data, recipe, dict.fromkeys(range(shards), 0))
    return ensemble.eval(), stats


def train_stages(ensemble: SisaEnsemble, model_name: str, data: Dataset, recipe: Recipe,
                 first: dict[int, int]) -> dict:
    """(Re)train, in place, stages first[s]..R−1 of every shard s in `first` on its slices without the
    forgotten ids, from its checkpoint first[s]−1; other shards and earlier checkpoints are not touched.
    A stage left without data keeps its previous checkpoint (stage 0: the initialisation).
    Returns shards_retrained, slices_retrained and sample_grads (Σ e'·|stage data|)."""
    R, seed, device = ensemble.slices, int(ensemble.seed), ensemble.slot.device
    stage_recipe = recipe.with_epochs(stage_epochs(recipe.epochs, R))
    slot, kept = ensemble.slot.cpu().numpy(), ~ensemble.forgotten.cpu().numpy()
    grads = 0
    for r in range(R):
        masks = {s: kept & (slot // R == s) & (slot % R <= r) for s in sorted(first) if first[s] <= r}
        trained = [s for s, m in masks.items() if m.any()]
        if trained:
            init = None if r == 0 else {k: torch.stack([ensemble.stages[s][r - 1].state_dict()[k] for s in trained])
                                        for k in ensemble.stages[0][0].state_dict()}
            result = train_batched(model_name, data, stage_recipe, [stage_seed(seed, s, r) for s in trained],
                                   np.stack([masks[s] for s in trained]), device, init=init)
        for s in masks:
            if s in trained:
                state = result.state_dict(trained.index(s))
            elif r:
                state = ensemble.stages[s][r - 1].state_dict()
            else:
                init_seed = derive_seeds(stage_seed(seed, s, 0))[0]
                state = build_model(model_name, data.input_shape, data.num_classes, init_seed).state_dict()
            ensemble.stages[s][r].load_state_dict(state)
        grads += stage_recipe.epochs * sum(int(m.sum()) for m in masks.values())
    return {"shards_retrained": len(first), "slices_retrained": sum(R - r for r in first.values()),
            "sample_grads": grads}
