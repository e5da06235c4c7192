"""The logit-matching loop: the points it matches, the cap on R, its stopping rule and the blocks it trains."""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import matching.methods as methods
from attribution.evaluation import model_logits
from attribution.models import build_model
from matching.errors import MatchingError
from matching.finetune import MatchingConfig, match_logits, matching_points, retain_cap
from matching.windowed_head import precomputed_windows, windowed_head_gradient
from matching_reference import reference_match

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_matching_points_are_f_plus_r_times_f_retain_points():
    forget = np.array([3, 10, 20, 50])
    points = matching_points(forget, 100, 3.0, seed=7)
    assert np.isin(forget, points).all() and len(points) == 16
    assert np.array_equal(points, matching_points(forget, 100, 3.0, seed=7))
    assert not np.array_equal(points, matching_points(forget, 100, 3.0, seed=8))
    assert matching_points(np.array([1, 2]), 5, 3.0, seed=0).tolist() == [0, 1, 2, 3, 4]  # capped at all of S


def test_max_retain_caps_the_retain_points_and_zero_leaves_them():
    forget = np.arange(0, 100, 5)  # 20 ids: R = 60 uncapped
    capped = matching_points(forget, 300, 3.0, seed=7, max_retain=25)
    assert len(capped) == 20 + 25 and np.isin(forget, capped).all()
    assert np.array_equal(matching_points(forget, 300, 3.0, seed=7, max_retain=0), matching_points(forget, 300, 3.0, seed=7))
    assert len(matching_points(forget, 300, 3.0, seed=7, max_retain=500)) == 20 + 60  # a cap above r·|F| changes nothing


@pytest.mark.parametrize("max_retain, model_name, whole, cap", [
    (None, "mlp", False, 100), (None, "mlp", True, 0), (None, "cnn1d", False, 50), (None, "cnn1d", True, 100),
    (None, None, True, 100), (None, "resnet9", False, 100), (25, "mlp", True, 25), (0, "cnn1d", False, 0)])
def test_the_cap_on_r_is_the_models_default_for_the_request_unless_given(max_retain, model_name, whole, cap):
    assert retain_cap(max_retain, model_name, whole) == cap


@pytest.mark.parametrize("model_name, whole, cap", [("mlp", [3], 0), ("mlp", [], 100), ("cnn1d", [3], 100),
                                                    ("cnn1d", [], 50)])
def test_the_cap_retain_cap_resolves_reaches_the_points_matched(monkeypatch, model_name, whole, cap):
    """The cap `retain_cap` resolves (0: none) reaches the points matched, and the stats record it, for DMM (told the
    classes its targets delete whole) and OM (which reads them from F's labels)."""
    from attribution.datasets import load_dataset
    from matching.finetune import MatchingStats

    data = load_dataset("digits")
    forget = np.flatnonzero(data.y_train.numpy() == 3)  # all 146 training points of class 3
    captured = {}

    def spy(model, inputs, targets, config):
        captured["inputs"] = inputs
        return model, MatchingStats(1.0, 0.0, 1, 1, 0, 1, 0.0)

    monkeypatch.setattr(methods, "match_logits", spy)
    targets = np.zeros((data.n_points, data.num_classes), dtype=np.float32)
    task = methods.UnlearnTask(model=nn.Linear(1, 1), data=data, forget_ids=forget, store=None,
                               original_logits=targets, model_name=model_name)
    unlearned = methods.match_on_forget_and_retain(task, targets, whole)
    points = matching_points(forget, data.n_train, 3.0, 0, max_retain=cap)
    assert len(points) == len(forget) + (cap or 3 * 146) and torch.equal(captured["inputs"], data.x_train[points])
    assert unlearned.stats["max_retain"] == cap
    # OM's targets are the oracles', which hold the whole class's real shift: the same rule from the labels alone
    om = methods.oracle_matching(replace(task, forget_ids=forget if whole else forget[:145], oracle_mean_logits=targets))
    assert om.stats["max_retain"] == cap


def test_match_logits_fits_all_k_logits_and_stops_by_its_rule():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    model = torch.nn.Linear(5, 4)
    with torch.no_grad():
        targets = model(x) + torch.tensor([0.0, 0.0, 0.0, 1.5])  # only a non-argmax logit moves
    model, stats = match_logits(model, x, targets, MatchingConfig(lr=1e-2, batch_size=16, lr_decay=1.0))
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(model(x), targets) < 0.01
    assert stats.loss_start == pytest.approx(1.5 ** 2 / 4) and stats.loss_end < 0.01
    assert stats.sample_grads == 16 * stats.steps and stats.steps >= MatchingConfig().min_steps

    # the defaults (a constant lr), and a decay per epoch, against the loop written out: 1,100 points are 18
    # minibatches of 64 (and one of 12) per epoch, so a decay per step (or none, or another factor) gives other
    # parameters; the stop is the same
    defaults = MatchingConfig()
    assert (defaults.lr, defaults.batch_size, defaults.lr_decay, defaults.min_steps, defaults.anneal_steps,
            defaults.max_steps, defaults.tol, defaults.patience, defaults.retain_ratio,
            defaults.max_retain) == (5e-3, 64, 1.0, 100, 100, 5000, 1e-3, 5, 3.0, None)
    x, targets = torch.randn(1100, 5), torch.randn(1100, 4)

    def start():
        torch.manual_seed(1)
        return torch.nn.Linear(5, 4)

    for config in (defaults, MatchingConfig(lr_decay=0.97)):
        got, stats = match_logits(start(), x, targets, config)
        want, (loss_start, loss_end), losses, steps = reference_match(start(), x, targets, config)
        for g, w in zip(got.parameters(), want.parameters()):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        assert stats.steps == steps and stats.annealed == config.anneal_steps
        assert config.min_steps + config.anneal_steps <= steps < config.max_steps
        assert stats.loss_start == pytest.approx(loss_start, rel=1e-6)
        assert stats.loss_end == pytest.approx(loss_end, rel=1e-6)
    per_step, _, _, _ = reference_match(start(), x, targets, config, per_step=True)
    assert max((w - s).abs().max().item() for w, s in zip(want.parameters(), per_step.parameters())) > 1e-5
    capped, capped_stats = match_logits(start(), x, targets, MatchingConfig(min_steps=5, max_steps=30))
    assert capped_stats.steps == 30 and capped_stats.sample_grads == 1100 + 12 * 64  # a whole epoch (18 steps), then 12


def test_the_anneal_continues_the_converged_run_and_ends_lower():
    """Targets near the model's outputs (as mnist1d's TRAK targets are): at a constant lr Adam stays at a noise
    floor; the anneal takes exactly anneal_steps more steps from the same plateau and ends well below it."""
    torch.manual_seed(0)
    x = torch.randn(200, 20)

    def net():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    with torch.no_grad():
        targets = net()(x) + 0.05 * torch.randn(200, 10, generator=torch.Generator().manual_seed(2))
    _, constant = match_logits(net(), x, targets, MatchingConfig(anneal_steps=0))
    _, annealed = match_logits(net(), x, targets, MatchingConfig())
    assert constant.annealed == 0 and annealed.annealed == MatchingConfig().anneal_steps
    assert annealed.steps == constant.steps + annealed.annealed  # the same run until its plateau
    assert annealed.loss_end < 0.7 * constant.loss_end and annealed.loss_end < 0.3 * annealed.loss_start


def test_train_blocks_matches_the_last_blocks_on_the_frozen_trunks_outputs():
    """train_blocks = k: every weight and buffer before the last k blocks (BatchNorm's running statistics included)
    stays bit-identical, and the last k end where the reference loop takes a copy of them when it matches on the
    trunk's outputs computed by hand in eval mode; k at least the number of blocks is the whole model's matching."""
    torch.manual_seed(0)
    x, targets = torch.randn(300, 6), torch.randn(300, 4)

    def net():
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        model(torch.randn(32, 6))  # running statistics that are not BatchNorm's initial ones
        return model

    config = MatchingConfig(train_blocks=2, min_steps=20, anneal_steps=10)
    original = net()
    got, stats = match_logits(net(), x, targets, config)
    for (name, g), w in zip(got[:3].state_dict().items(), original[:3].state_dict().values()):
        assert torch.equal(g, w), name
    with torch.no_grad():
        features = original[:3].eval()(x)
    want, (loss_start, loss_end), _, steps = reference_match(copy.deepcopy(original[3:]), features, targets, config)
    for g, w, before in zip(got[3:].parameters(), want.parameters(), original[3:].parameters()):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        assert (g - before).abs().max() > 1e-3
    assert stats.steps == steps and stats.loss_start == pytest.approx(loss_start, rel=1e-6)
    assert stats.loss_end == pytest.approx(loss_end, rel=1e-6) and loss_end < 0.9 * loss_start
    every, every_stats = match_logits(net(), x, targets, replace(config, train_blocks=0))
    for k in (4, 9):  # the model has 4 blocks: Linear, BatchNorm1d, Linear, Linear
        same, same_stats = match_logits(net(), x, targets, replace(config, train_blocks=k))
        assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), every.state_dict().values()))
        assert same_stats.loss_end == every_stats.loss_end


def test_train_blocks_on_cnn1d_matches_its_last_convolution_on_its_precomputed_windows():
    """cnn1d's head starts with a convolution, whose windows of the frozen trunk's outputs the matching computes once:
    the head ends where the reference loop takes it on the trunk's outputs (its convolution windowing them at every
    step), and the trunk does not move."""
    x = torch.randn(150, 40, generator=torch.Generator().manual_seed(0))
    original = build_model("cnn1d", (40,), 10, seed=0)
    with torch.no_grad():
        features = original[:5].eval()(x)
        targets = original(x) + 0.3 * torch.randn(150, 10, generator=torch.Generator().manual_seed(1))
    config = MatchingConfig(train_blocks=2, min_steps=30, anneal_steps=10)
    got, stats = match_logits(copy.deepcopy(original), x, targets, config)
    assert all(torch.equal(g, w) for g, w in zip(got[:5].parameters(), original[:5].parameters()))
    want, (loss_start, loss_end), _, steps = reference_match(copy.deepcopy(original[5:]), features, targets, config)
    for g, w, before in zip(got[5:].parameters(), want.parameters(), original[5:].parameters()):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        assert (g - before).abs().max() > 1e-3
    assert stats.steps == steps and stats.loss_end == pytest.approx(loss_end, rel=1e-5) and loss_end < 0.5 * loss_start


def test_the_windowed_heads_hand_written_gradients_are_autograds():
    """cnn1d's head on its precomputed windows: the written-out step's loss and gradients are autograd's through the
    head on the trunk's outputs (to rounding; the same to the bit on this CPU), set on the head's own parameters; any
    other head gets None (autograd's step)."""
    head = build_model("cnn1d", (40,), 10, seed=0)[5:]
    features = torch.randn(64, 32, 10, generator=torch.Generator().manual_seed(0)).relu()
    targets = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    windowed, windows = precomputed_windows(head, features)
    loss = windowed_head_gradient(windowed)(windows, targets)
    got = [p.grad for p in head.parameters()]
    head.zero_grad(set_to_none=True)
    want = torch.nn.functional.mse_loss(head(features), targets)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=0, atol=1e-7)
    for g, p in zip(got, head.parameters()):
        assert g.shape == p.shape and g.is_contiguous()
        torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-7)
    assert windowed_head_gradient(head) is None  # not on windows
    no_bias = torch.nn.Sequential(*windowed[:3], torch.nn.Linear(160, 10, bias=False))
    assert windowed_head_gradient(no_bias) is None
    assert windowed_head_gradient(torch.nn.Sequential(*windowed[:2], windowed[3])) is None


def test_train_blocks_refuses_a_model_whose_children_do_not_run_in_order():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) + self.b(x)

    with pytest.raises(MatchingError, match="nn.Sequential.*train blocks 0"):
        match_logits(TwoHeads(), torch.randn(8, 3), torch.randn(8, 2), MatchingConfig(train_blocks=1))


@pytest.mark.parametrize("bad", [dict(min_steps=0), dict(anneal_steps=-1), dict(min_steps=10, max_steps=5), dict(batch_size=0),
                                 dict(lr=0.0), dict(lr_decay=1.5), dict(tol=-1.0), dict(patience=0),
                                 dict(retain_ratio=-1.0), dict(max_retain=-1), dict(max_retain=True),
                                 dict(max_retain=50.5), dict(train_blocks=-1),
                                 dict(train_blocks=True), dict(train_blocks=1.5)])
def test_matching_config_refuses_bad_settings(bad):
    with pytest.raises(MatchingError):
        MatchingConfig(**bad)


@pytest.mark.parametrize("dataset, model_name, blocks, default", [("mnist1d", "cnn1d", None, 2), ("mnist1d", "cnn1d", 0, 0),
                                                                  ("digits", "mlp", None, 0)])
def test_matching_trains_the_models_default_blocks_unless_told(dataset, model_name, blocks, default):
    """DMM/OM's matching trains `attribution.models.matching_blocks` of the task's model (cnn1d: its last convolution
    and the output layer; else every weight) unless train_blocks says otherwise; the stats record what it trained."""
    from attribution.datasets import load_dataset
    from matching.methods import UnlearnTask, match_on_forget_and_retain

    data = load_dataset(dataset)
    original = build_model(model_name, data.input_shape, data.num_classes, 0)
    logits = model_logits(original, data.all_inputs()).numpy()
    targets = logits + np.random.default_rng(0).normal(0, 0.5, logits.shape).astype(np.float32)
    task = UnlearnTask(model=copy.deepcopy(original), data=data, forget_ids=np.arange(8), store=None,
                       original_logits=logits, model_name=model_name,
                       config=MatchingConfig(min_steps=10, anneal_steps=5, train_blocks=blocks))
    unlearned = match_on_forget_and_retain(task, targets, [])
    assert unlearned.stats["train_blocks"] == default
    moved = [not torch.equal(a, b) for a, b in zip(unlearned.model.parameters(), original.parameters())]
    assert moved == ([False] * 4 + [True] * 4 if default == 2 else [True] * len(moved))
