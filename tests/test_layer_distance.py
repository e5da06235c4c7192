"""Per-layer relative L2 distance from the original (matching/layer_distance.py), by hand."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from matching.errors import MatchingError
from matching.layer_distance import layer_distances


def test_distances_by_hand():
    original = {"w": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([0.0]), "steps": torch.tensor(7)}
    edited = {"w": torch.tensor([[3.0, 7.0]]), "b": torch.tensor([0.0]), "steps": torch.tensor(9)}
    # w: ‖(0, 3)‖ / ‖(3, 4)‖ = 3/5; b: 0/0 = 0; total: ‖(0, 3, 0)‖ / ‖(3, 4, 0)‖ = 3/5; int buffer skipped.
    assert layer_distances(edited, original) == {"w": 0.6, "b": 0.0, "total": 0.6}
    edited["b"] = torch.tensor([2.0])
    # b moved away from zero: inf; total ‖(0, 3, 2)‖ / 5 = √13 / 5.
    got = layer_distances(edited, original)
    assert got["b"] == math.inf and got["total"] == pytest.approx(math.sqrt(13) / 5)
    # The original is the denominator: swapping the arguments changes the answer.
    assert layer_distances(original, edited)["w"] == pytest.approx(3 / math.sqrt(58))


def test_identical_models_are_zero_and_a_module_state_dict_works():
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    assert set(layer_distances(a.state_dict(), a.state_dict()).values()) == {0.0}
    got = layer_distances(b.state_dict(), a.state_dict())
    assert "1.num_batches_tracked" not in got and got["1.running_mean"] == 0.0
    w_a, w_b = a.state_dict()["0.weight"], b.state_dict()["0.weight"]
    assert got["0.weight"] == pytest.approx(float((w_b - w_a).norm() / w_a.norm()))


@pytest.mark.parametrize("edited, message", [
    ({"w": torch.zeros(2)}, "name different tensors"),
    ({"w": torch.zeros(3), "b": torch.zeros(1)}, "has shape"),
])
def test_mismatched_state_dicts_are_errors(edited, message):
    with pytest.raises(MatchingError, match=message):
        layer_distances(edited, {"w": torch.zeros(2), "b": torch.zeros(1)})
    with pytest.raises(MatchingError, match="named 'total'"):
        layer_distances({"total": torch.zeros(1)}, {"total": torch.zeros(1)})
