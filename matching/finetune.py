"""Logit matching (DESIGN.md §1.3–1.4): fine-tune θ so that f_x(θ) ≈ h(x) on F ∪ R.

The loss is the MSE over all k logits; R is r·|F| retain points drawn at random from S∖F, at most `max_retain`
of them (0: no cap; by default the model's, `retain_cap`: 100, 50 on `cnn1d`'s partial requests). Uncapped, a large
request's loss is mostly R's, and where the model cannot move F as far as h asks without moving R the matching
settled between θ0 and h on F (mnist1d's CNN; README, "The cap on R"). A request that deletes whole classes moves
every point's target by the class's measured shift, so R carries as much of it as F: there `mlp` takes all of R and
`cnn1d` 100 (README, "Whole-class deletions"). `attribution.models.RETAIN_CAPS` holds the per-model caps.
DMM takes h from DM-Direct, OM from the mean logits of real oracles; the loop is the same.

Stopping rule. The paper's recipe (Adam, lr 5e-4, batch 512, 5 epochs) was set for CIFAR-10 with
|F| up to 1,000; on a small request it is a handful of optimiser steps and the model does not move.
So the matching runs in epochs over F ∪ R (Adam, lr × lr_decay after every epoch) until it has
converged: each epoch's loss is the mean of its minibatches' losses (each point of F ∪ R counted once,
at the parameters it was stepped from — no extra forward pass), and it has converged once it has taken
at least `min_steps` steps and the best epoch loss has not fallen by more than tol · L_start over the
last `patience` epochs. Then it anneals: `anneal_steps` more steps with the lr falling linearly to 0,
and stops (or at `max_steps`). Every run reports the full matching loss L = MSE(f(θ; F ∪ R), h) (eval
mode) at start and end, the steps and epochs taken, the anneal's steps and the per-sample gradients it
evaluated (`MatchingStats`).

Why the anneal. At a constant lr Adam's steps keep a size of about lr whatever the gradient, so the loss
settles at a noise floor; where h is close to θ0's outputs (mnist1d's TRAK targets: L_start ≈ 0.003)
that floor is above L_start and a constant-lr matching ends worse than it started. A per-epoch decay
anneals, but ties the schedule to |F ∪ R| (a request of 40 points has one step an epoch: 0.97 per epoch
left 0.2 % of the lr by step 200, and the loss stalled rather than converged). The anneal counts steps.
README, "The matching's stopping rule and its defaults", has the sweep behind the defaults;
docs/matching_sweeps.md what else was tried.

Cost. On a small model a step's cost is mostly fixed (mnist1d's CNN on one CPU thread: 0.7 ms for 8
points, 1.4 ms for 64), so a request's wall time is its steps: Adam runs fused where torch has the
kernel (CPU, CUDA), and the rule reads the minibatch losses instead of a full pass after every epoch
(one per step on requests of ≤ 64 points). With `train_blocks` = k only the last k blocks train, on
the frozen trunk's outputs computed once (`frozen_trunk`): on mnist1d's CNN (k = 2 by default there,
`attribution.models.MATCHING_BLOCKS`) a step costs half as much and KLoM is the same (README, "Matching the
last blocks"); there the convolution's windows of those outputs are computed once too, and the step's gradients are
written out (`matching.windowed_head`: autograd's to the bit, at half a step's cost).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attribution.models import RETAIN_CAPS, parameter_blocks

from .errors import MatchingError
from .windowed_head import precomputed_windows, windowed_head_gradient

FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where torch's fused Adam kernel exists; elsewhere the for-loop one


@dataclass(frozen=True)
class MatchingConfig:
    """The fine-tuning of DMM/OM and its stopping rule (module docstring); defaults from the digits sweep (README)."""
    lr: float = 5e-3
    batch_size: int = 64
    lr_decay: float = 1.0      # lr × lr_decay after every epoch (1: constant, see the module docstring)
    anneal_steps: int = 100    # after the plateau: this many more steps, the lr falling linearly to 0
    retain_ratio: float = 3.0  # r: |R| = round(r·|F|)
    max_retain: int | None = None  # |R| at most this many (0: no cap); None: the model's default (`retain_cap`: 100,
                                   # 50 on cnn1d's partial requests, none on mlp's whole-class ones)
    min_steps: int = 100       # at least this many optimiser steps at the full lr, however small F ∪ R is
    max_steps: int = 5000      # at most this many
    tol: float = 1e-3          # converged: the best loss fell by < tol · L_start over `patience` epochs
    patience: int = 5
    seed: int = 0              # draws R and the minibatch order (and DMM's spread on F)
    train_blocks: int | None = None  # k: only the last k blocks train, the rest frozen (`frozen_trunk`); 0: every
                                     # weight; None: the model's default (`attribution.models.matching_blocks`)
    spread: float | None = None  # DMM: a, adding a·s_x·N(0, 1) to F's true-class targets; None: 1 where the store has
                                 # s_x (`dmm calibrate`), else 0 (README, "DMM's spread on F")

    def __post_init__(self):
        if self.anneal_steps < 0:
            raise MatchingError(f"anneal steps {self.anneal_steps} is negative; use >= 0 (default 100)")
        if self.batch_size < 1 or self.patience < 1 or not 1 <= self.min_steps <= self.max_steps:
            raise MatchingError(f"need batch size >= 1, patience >= 1 and 1 <= min steps <= max steps, got "
                                f"{self.batch_size}, {self.patience}, {self.min_steps}, {self.max_steps}; raise them")
        if not self.lr > 0 or not 0 < self.lr_decay <= 1 or not self.tol >= 0:
            raise MatchingError(f"need lr > 0, 0 < lr decay <= 1 and tol >= 0, got lr={self.lr}, "
                                f"decay={self.lr_decay}, tol={self.tol}; e.g. --lr 5e-3 --lr-decay 1 --tol 1e-3")
        if not self.retain_ratio >= 0:
            raise MatchingError(f"retain ratio {self.retain_ratio} is negative; use r >= 0 (default 3)")
        if self.spread is not None and (isinstance(self.spread, bool) or not isinstance(self.spread, (int, float))
                                        or not self.spread >= 0):
            raise MatchingError(f"spread {self.spread!r} is not a number >= 0; use a >= 0 (0: DM-Direct's mean, 1: the "
                                "calibrated s_x), or leave it out (1 where the store has s_x)")
        if self.train_blocks is not None and (isinstance(self.train_blocks, bool) or not isinstance(self.train_blocks, int)
                                              or self.train_blocks < 0):
            raise MatchingError(f"train blocks {self.train_blocks!r} is not an integer >= 0; use 0 (every weight), k "
                                "(the last k blocks), or leave it out (the model's default)")
        if self.max_retain is not None and (isinstance(self.max_retain, bool) or not isinstance(self.max_retain, int)
                                            or self.max_retain < 0):
            raise MatchingError(f"max retain {self.max_retain!r} is not an integer >= 0; use M >= 0 (0: no cap), or "
                                "leave it out (the model's default: `dmm unlearn --help`)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MatchingStats:
    """What one matching run did: loss on F ∪ R at start and end, optimiser steps, epochs, sample gradients."""
    loss_start: float
    loss_end: float
    steps: int
    epochs: int
    annealed: int      # steps taken in the anneal (the lr falling to 0); < anneal_steps only at max_steps
    sample_grads: int  # per-sample gradient evaluations (Σ batch sizes): the compute unit of the report
    seconds: float     # wall time of the fine-tuning, loss evaluations included

    def to_dict(self) -> dict:
        return asdict(self)


RETAIN_CAP = 100  # |R| at most, by default, on a model `RETAIN_CAPS` does not list (README, "The cap on R")


def retain_cap(max_retain: int | None, model_name: str | None, deletes_whole_classes: bool) -> int:
    """The cap on |R| a request uses (0: none): `max_retain` where it is given, else the model's default for a request
    that deletes part of its classes or whole classes (`RETAIN_CAPS`; `RETAIN_CAP` on both for a model not listed)."""
    if max_retain is not None:
        return max_retain
    return RETAIN_CAPS.get(model_name, (RETAIN_CAP, RETAIN_CAP))[int(deletes_whole_classes)]


def matching_points(forget_ids: np.ndarray, n_train: int, retain_ratio: float, seed: int,
                    fitted: np.ndarray | None = None, max_retain: int = 0) -> np.ndarray:
    """Sorted F ∪ R, R = round(r·|F|) points drawn without replacement from S∖F (all of S∖F if fewer; at most
    `max_retain` when it is > 0).

    With ``fitted`` (the point ids of a target-subset fit, whose h is known only there) both come from
    its train points T: F ∩ T, and R from T∖F, still round(r·|F|) of them (all of T∖F if fewer; capped alike).
    """
    forget_ids = np.asarray(forget_ids, dtype=np.int64)
    pool = np.arange(n_train) if fitted is None else np.asarray(fitted, dtype=np.int64)[np.asarray(fitted) < n_train]
    retain = np.setdiff1d(pool, forget_ids)
    size = min(len(retain), int(round(retain_ratio * len(forget_ids))), max_retain or len(retain))
    drawn = np.random.default_rng(seed).choice(retain, size=size, replace=False)
    return np.union1d(forget_ids if fitted is None else np.intersect1d(forget_ids, pool), drawn)


def frozen_trunk(model: nn.Module, blocks: int | None) -> tuple[nn.Module | None, nn.Module]:
    """(trunk, head) for matching only the model's last `blocks` blocks (`attribution.models.parameter_blocks`):
    the head runs from the first of them on, the trunk before it stays as it is, weights and buffers (eval
    mode). (None, model) when every weight trains: `blocks` 0 (or None) or at least the model's number of blocks."""
    names = parameter_blocks(model)
    if not blocks or blocks >= len(names):
        return None, model
    if not isinstance(model, nn.Sequential):
        raise MatchingError(f"train blocks {blocks} needs an nn.Sequential model (children run in order), not "
                            f"{type(model).__name__}; use train blocks 0 (every weight)")
    start = [name for name, _ in model.named_children()].index(names[-blocks])
    return model[:start], model[start:]


@torch.no_grad()
def trunk_outputs(trunk: nn.Module, inputs: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The frozen trunk's outputs on `inputs` (eval mode), computed once: the head's inputs for every step."""
    trunk.eval()
    device = next(trunk.parameters()).device  # a trunk holds at least one block
    return torch.cat([trunk(x.to(device)) for x in inputs.split(chunk)])


@torch.no_grad()
def matching_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> float:
    """L = mean over points and logits of (f(θ; x) − h(x))², the model in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    total = sum(F.mse_loss(model(x.to(device)), t.to(device), reduction="sum").item()
                for x, t in zip(inputs.split(chunk), targets.split(chunk)))
    return total / targets.numel()


def match_logits(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 config: MatchingConfig) -> tuple[nn.Module, MatchingStats]:
    """Fine-tune `model` in place towards `targets` until the stopping rule holds; returns it and its stats.
    With `config.train_blocks` = k only the last k blocks train, on the frozen trunk's outputs (`frozen_trunk`)."""
    targets = torch.as_tensor(targets, dtype=torch.float32)
    if targets.shape[0] != inputs.shape[0]:
        raise MatchingError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets; give one target row per point")
    clock = time.perf_counter()
    full_model = model
    trunk, model = frozen_trunk(full_model, config.train_blocks)
    if trunk is not None:
        model, inputs = precomputed_windows(model, trunk_outputs(trunk, inputs))
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, fused=device.type in FUSED_ADAM_DEVICES)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=config.lr_decay)
    gradient = windowed_head_gradient(model) or autograd_gradient(model)
    order = torch.Generator().manual_seed(config.seed)
    start = matching_loss(model, inputs, targets)
    history = [start]
    steps = epochs = grads = annealed = 0
    anneal_from = None  # the lr when the plateau was reached; then the anneal runs
    while steps < config.max_steps:
        model.train()
        epoch_sum, epoch_points = torch.zeros((), device=device), 0
        for idx in torch.randperm(len(inputs), generator=order).split(config.batch_size):
            if anneal_from is not None:
                for group in opt.param_groups:
                    group["lr"] = anneal_from * (config.anneal_steps - annealed) / config.anneal_steps
                annealed += 1
            loss = gradient(inputs[idx].to(device), targets[idx].to(device))
            opt.step()
            epoch_sum += loss * len(idx)
            steps, grads, epoch_points = steps + 1, grads + len(idx), epoch_points + len(idx)
            if steps == config.max_steps or (anneal_from is not None and annealed == config.anneal_steps):
                break
        epochs += 1
        if anneal_from is not None:
            if annealed == config.anneal_steps:
                break
            continue
        sched.step()
        history.append(epoch_sum.item() / epoch_points)
        if steps >= config.min_steps and _plateaued(history, config.patience, config.tol * start):
            if config.anneal_steps == 0:
                break
            anneal_from = opt.param_groups[0]["lr"]
    end = matching_loss(model, inputs, targets)
    return full_model, MatchingStats(start, end, steps, epochs, annealed, grads, time.perf_counter() - clock)


def autograd_gradient(model: nn.Module):
    """gradient(x, T): sets the model's .grad to ∂L/∂θ of L = MSE(f(θ; x), T) by autograd and returns L (detached)."""
    def gradient(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.mse_loss(model(inputs), targets)
        model.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    return gradient


def _plateaued(history: list[float], patience: int, threshold: float) -> bool:
    """The best epoch loss of the last `patience` epochs is not below the best before them by more than `threshold`."""
    if len(history) <= patience:
        return False
    return min(history[:-patience]) - min(history[-patience:]) <= threshold
