"""Logit matching (DESIGN.md §1.3–1.4): fine-tune θ so that f_x(θ) ≈ h(x) on F ∪ R.

The loss is the MSE over all k logits; R is r·|F| retain points drawn at random from S∖F.
DMM takes h from DM-Direct, OM from the mean logits of real oracles; the loop is the same.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import MatchingError


@dataclass(frozen=True)
class MatchingConfig:
    """The fine-tuning recipe of DMM/OM; defaults are the paper's (Adam, lr 5e-4, batch 512, 5 epochs)."""
    epochs: int = 5
    lr: float = 5e-4
    batch_size: int = 512
    lr_decay: float = 0.95     # lr × lr_decay after every epoch
    retain_ratio: float = 3.0  # r: |R| = round(r·|F|)
    seed: int = 0              # draws R and the minibatch order

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise MatchingError(f"epochs ({self.epochs}) and batch size ({self.batch_size}) must be >= 1; raise them")
        if not self.lr > 0 or not 0 < self.lr_decay <= 1:
            raise MatchingError(f"need lr > 0 and 0 < lr decay <= 1, got lr={self.lr}, decay={self.lr_decay}; "
                                "e.g. --lr 5e-4 --lr-decay 0.95")
        if not self.retain_ratio >= 0:
            raise MatchingError(f"retain ratio {self.retain_ratio} is negative; use r >= 0 (default 3)")

    def to_dict(self) -> dict:
        return asdict(self)


def matching_points(forget_ids: np.ndarray, n_train: int, retain_ratio: float, seed: int) -> np.ndarray:
    """Sorted F ∪ R, R = round(r·|F|) points drawn without replacement from S∖F (all of S∖F if fewer)."""
    forget_ids = np.asarray(forget_ids, dtype=np.int64)
    retain = np.setdiff1d(np.arange(n_train), forget_ids)
    size = min(len(retain), int(round(retain_ratio * len(forget_ids))))
    drawn = np.random.default_rng(seed).choice(retain, size=size, replace=False)
    return np.union1d(forget_ids, drawn)


def match_logits(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 config: MatchingConfig) -> nn.Module:
    """Fine-tune `model` in place: Adam on MSE(f(θ; x), h(x)) over all k logits, lr × decay per epoch."""
    targets = torch.as_tensor(targets, dtype=torch.float32)
    if targets.shape[0] != inputs.shape[0]:
        raise MatchingError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets; give one target row per point")
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=config.lr_decay)
    order = torch.Generator().manual_seed(config.seed)
    model.train()
    for _ in range(config.epochs):
        for idx in torch.randperm(len(inputs), generator=order).split(config.batch_size):
            loss = F.mse_loss(model(inputs[idx].to(device)), targets[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()
