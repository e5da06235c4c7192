"""Relearn time (matching/relearn.py) on digits-sized data."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attribution.datasets import load_digits_dataset
from attribution.models import mlp
from matching.errors import MatchingError
from matching.relearn import relearn_steps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def forget():
    data = load_digits_dataset()
    return data.x_train[:40], data.y_train[:40]


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return mlp((64,), 10)


def steps_by_hand(model, x, y, lr, batch_size, seed):
    """The rule spelled out: Adam on CE over seeded passes through F, count steps until all of F is right."""
    model, order = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = 0
    while True:
        for idx in torch.randperm(len(x), generator=order).split(batch_size):
            with torch.no_grad():
                if (model.eval()(x).argmax(-1) == y).all():
                    return steps
            opt.zero_grad()
            F.cross_entropy(model.train()(x[idx]), y[idx]).backward()
            opt.step()
            steps += 1


def test_counts_the_first_step_that_reaches_the_target(forget):
    x, y = forget
    model = fresh_model()
    before = copy.deepcopy(model.state_dict())
    steps = relearn_steps(model, x, y, 1.0, lr=1e-2, batch_size=16, max_steps=500, seed=0)
    assert 1 <= steps <= 500
    assert steps == steps_by_hand(model, x, y, lr=1e-2, batch_size=16, seed=0)
    assert steps == relearn_steps(model, x, y, 1.0, lr=1e-2, batch_size=16, max_steps=500, seed=0)
    assert relearn_steps(model, x, y, 1.0, lr=1e-2, batch_size=16, max_steps=steps, seed=0) == steps
    assert relearn_steps(model, x, y, 1.0, lr=1e-2, batch_size=16, max_steps=steps - 1, seed=0) == steps  # never: max + 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} moved: relearning must train a copy"


def test_never_relearning_returns_max_steps_plus_one(forget):
    x, y = forget
    assert relearn_steps(fresh_model(), x, y, 1.0, lr=1e-9, max_steps=5) == 6


def test_a_target_already_met_is_zero_steps_even_when_rounded_to_float32():
    # Linear identity on one-hot inputs predicts the hot index; 7 of the 10 labels agree: accuracy 0.7.
    model = nn.Linear(10, 10)
    with torch.no_grad():
        model.weight.copy_(torch.eye(10))
        model.bias.zero_()
    x = torch.eye(10)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 0, 0])
    assert relearn_steps(model, x, y, float(np.float32(0.7))) == 0  # 0.699999988 still means 7 of 10
    assert relearn_steps(model, x, y, 0.7) == 0
    assert relearn_steps(model, x, y, 0.8, lr=0.1, max_steps=200) >= 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_accuracy=1.5), "0 <= target accuracy <= 1"),
    (dict(lr=0.0), "lr > 0"),
    (dict(max_steps=0), "max steps >= 1"),
    (dict(y_forget=torch.zeros(3, dtype=torch.long)), "one label per input"),
])
def test_bad_settings_are_one_line_errors(forget, kwargs, message):
    x, y = forget
    args = dict(model=fresh_model(), x_forget=x, y_forget=y, target_accuracy=1.0)
    args.update(kwargs)
    with pytest.raises(MatchingError, match=message):
        relearn_steps(**args)
