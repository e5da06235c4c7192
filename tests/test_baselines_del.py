"""DEL and the localisation × algorithm grid (matching/baselines/localised.py, channels.py): the criticality
formula against a brute-force loop, the greedy budget by hand, weights outside the mask bit-identical,
stacked equals one model at a time, and bad input as one line."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import attribution.engine as engine
from attribution.checkpoint import load_model, model_meta, save_model
from attribution.datasets import load_dataset
from attribution.evaluation import model_logits
from attribution.recipes import RECIPES
from cluster.cli import main
from cluster.eval_methods import load_model_from_state
from matching.baselines.channels import Channels, criticality, greedy_channels
from matching.baselines.last_blocks import reinitialised
from matching.baselines.localised import ALGORITHMS, LOCALISATIONS, DELConfig, localisation, reset
from matching.baselines.masks import forget_gradients
from matching.baselines.stack import ModelStack, StackedTask
from matching.errors import MatchingError
from matching.methods import METHOD_CONFIGS, METHODS, STACKED_METHODS, UnlearnTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORGET = np.arange(0, 1400, 28)  # 50 training ids
RECIPE = RECIPES["digits-mlp"].with_epochs(4)
N = 3


@pytest.fixture(scope="module")
def world():
    data = load_dataset("digits")
    originals = engine.train_batched("mlp", data, RECIPE, list(range(N)), np.ones((N, data.n_train), bool))
    return data, originals


def original(world, n: int = 0) -> nn.Module:
    data, originals = world
    return load_model_from_state("mlp", data, originals.state_dict(n))


def unlearn(world, model: nn.Module, **params):
    data, _ = world
    task = UnlearnTask(model=model, data=data, forget_ids=FORGET, store=None, original_logits=None,
                       config=DELConfig(**{"epochs": 1, **params}), model_name="mlp", recipe=RECIPE)
    return METHODS["del"](task)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def conv_bn() -> nn.Module:
    """A tiny conv model on digits' 8 × 8 images: conv with bias, BatchNorm, conv without bias, linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 3, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(48, 10)).eval()


def test_del_is_registered_with_the_papers_defaults():
    assert "del" in STACKED_METHODS and METHOD_CONFIGS["del"] is DELConfig
    c = DELConfig()
    assert (c.localisation, c.algorithm, c.budget, c.lr, c.weight_decay) == ("del", "reset-finetune", 0.3, 0.015, 0.0)
    assert set(LOCALISATIONS) == {"del", "deepest", "shallowest", "salloc"}
    assert set(ALGORITHMS) == {"reset-finetune", "random-label", "neggrad+"}


@pytest.mark.parametrize("params, needle", [
    ({"localisation": "middle"}, "localisation 'middle' is not one of del, deepest, shallowest, salloc; "
                                 "e.g. --set localisation=del"),
    ({"algorithm": "ga"}, "algorithm 'ga' is not one of reset-finetune, random-label, neggrad+"),
    ({"budget": 0.0}, "budget 0.0 must lie in (0, 1]"),
    ({"alpha": 1.5}, "alpha 1.5 must lie in [0, 1]"),
])
def test_bad_hyperparameters_are_one_line_errors(params, needle):
    with pytest.raises(MatchingError) as e:
        DELConfig(**params)
    assert needle in str(e.value) and "\n" not in str(e.value)


def brute_criticality(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per module (registration order), per output channel c: the entries θ[c] of each own parameter,
    |θ · ∂ Σ CE / ∂θ| sorted, the mean of the ⌈E/10⌉ largest; one Python loop over channels."""
    model.eval()
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    params = {k: v.detach() for k, v in params.items()}
    out = []
    for prefix, module in model.named_modules():
        names = [f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)]
        if not names:
            continue
        for c in range(params[names[0]].shape[0]):
            entries = [abs(float(params[n][c].flatten()[i]) * float(grads[n][c].flatten()[i]))
                       for n in names for i in range(params[n][c].numel())]
            top = sorted(entries, reverse=True)[:math.ceil(len(entries) / 10)]
            out.append(sum(top) / len(top))
    return out


@pytest.mark.parametrize("which", ["digits mlp", "conv + batchnorm"])
def test_criticality_equals_a_brute_force_loop(world, which):
    data, _ = world
    model = original(world) if which == "digits mlp" else conv_bn()
    x, y = data.x_train[FORGET], data.y_train[FORGET]
    stack = ModelStack.of([model])
    got = criticality(stack, forget_gradients(stack, x, y))
    expected = torch.tensor(brute_criticality(model, x, y))
    assert got.shape == (1, len(expected)) and expected.min() >= 0 and expected.max() > 0
    torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-7)
    if which == "conv + batchnorm":  # conv 4 × (9 + 1), batchnorm 4 × 2, conv 3 × 36, linear 10 × 49
        assert Channels.of(stack).sizes(stack).tolist() == [10] * 4 + [2] * 4 + [36] * 3 + [49] * 10


def tiny_stack() -> tuple[ModelStack, dict[str, torch.Tensor]]:
    """Two models Linear(12, 3) → ReLU → Linear(3, 2) with hand-set |θ ⊙ g| (47 parameters; channels of
    module 0 hold 13 entries, so their criticality is the mean of the top 2; module 2's hold 4: the max)."""
    base = nn.Sequential(nn.Linear(12, 3), nn.ReLU(), nn.Linear(3, 2))
    stack = ModelStack.of([base, base])
    theta = {k: -torch.ones_like(v) for k, v in stack.params.items()}  # |θ| = 1: |θ ⊙ g| = |g|
    g = {k: torch.zeros_like(v) for k, v in stack.params.items()}
    g["0.weight"][:, 0, :2] = torch.tensor([5.0, 3.0])    # channel 0 of module 0: (5 + 3) / 2 = 4
    g["0.weight"][:, 1, :3] = 1.0                        # channel 1: 1
    g["0.bias"][:, 2] = -6.0                             # channel 2: (6 + 0) / 2 = 3 (its max 6 is the largest entry)
    g["2.weight"][:, 0, 1] = 3.5                         # module 2 channel 0: 3.5
    g["2.bias"][:, 1] = 0.5                              # channel 1: 0.5
    g["2.weight"][1] *= 10                               # model 1: module 2's channels 35 and 5
    g["2.bias"][1] *= 10
    return ModelStack(stack.base, theta, stack.buffers), g


def test_greedy_budget_by_hand():
    stack, g = tiny_stack()
    scores = criticality(stack, g)
    torch.testing.assert_close(scores, torch.tensor([[4.0, 1.0, 3.0, 3.5, 0.5], [4.0, 1.0, 3.0, 35.0, 5.0]]))
    sizes = Channels.of(stack).sizes(stack)
    assert sizes.tolist() == [13, 13, 13, 4, 4]
    # model 0 takes m0c0, m2c0, m0c2 (13 + 4 + 13 = 30 ≤ 0.7·47 = 32.9); at 0.75 (35.25) the next, m0c1,
    # does not fit and ends the selection, though m2c1 (4) would have fitted.
    # model 1 takes m2c0, m2c1, m0c0 (4 + 4 + 13 = 21; m0c2 would make 34 > 32.9, but fits in 35.25)
    assert greedy_channels(scores, sizes, 0.7).tolist() == [[True, False, True, True, False],
                                                            [True, False, False, True, True]]
    assert greedy_channels(scores, sizes, 0.75).tolist() == [[True, False, True, True, False],
                                                             [True, False, True, True, True]]
    entries = Channels.of(stack).mask(greedy_channels(scores, sizes, 0.7), stack.params)
    for name, rows in (("0.weight", [[True, False, True], [True, False, False]]),
                       ("2.weight", [[True, False], [True, True]])):
        assert entries[name].all(2).tolist() == rows and entries[name].any(2).tolist() == rows
    assert entries["0.bias"].tolist() == [[True, False, True], [True, False, False]]
    assert entries["2.bias"].tolist() == [[True, False], [True, True]]
    assert [sum(int(m[n].sum()) for m in entries.values()) for n in range(2)] == [30, 21]


def test_deepest_and_shallowest_take_layers_from_either_end():
    stack, _ = tiny_stack()
    x, y = torch.zeros(1, 12), torch.zeros(1, dtype=torch.long)
    shallow = LOCALISATIONS["shallowest"](stack, x, y, 0.7)  # m0c0, m0c1 (26); m0c2 would make 39 > 32.9
    deep = LOCALISATIONS["deepest"](stack, x, y, 0.7)        # m2c0, m2c1, m0c0 (21); m0c1 would make 34
    assert shallow["0.bias"].tolist() == [[True, True, False]] * 2 and not shallow["2.weight"].any()
    assert deep["0.bias"].tolist() == [[True, False, False]] * 2 and deep["2.weight"].all()


@pytest.mark.parametrize("loc", sorted(LOCALISATIONS))
def test_masks_respect_the_budget(world, loc):
    data, _ = world
    model = original(world)
    stack = ModelStack.of([model])
    total = sum(p.numel() for p in model.parameters())
    for budget in (0.1, 0.3):
        mask = LOCALISATIONS[loc](stack, data.x_train[FORGET], data.y_train[FORGET], budget)
        kept = sum(int(m.sum()) for m in mask.values())
        if loc == "salloc":
            assert kept == round(budget * total)
        else:  # whole channels: within the budget, and short of it by less than the largest channel (257)
            assert budget * total - 257 < kept <= budget * total
            for name, m in mask.items():
                rows = m[0].reshape(m.shape[1], -1)
                assert torch.equal(rows.all(1), rows.any(1)), name


def test_reset_draws_each_entry_from_a_fresh_init_whatever_else_is_masked(world):
    stack = ModelStack.of([original(world, 0), original(world, 1)])
    fresh = reinitialised(stack, list(stack.params), (7, 8))
    half = {k: torch.rand(v.shape, generator=torch.Generator().manual_seed(1)) < 0.5 for k, v in stack.params.items()}
    some = {"3.weight": half["3.weight"]}  # the output layer only: its fresh values must not shift
    for mask in (half, some):
        out = reset(stack, mask, (7, 8))
        for k, v in stack.params.items():
            m = mask.get(k, torch.zeros_like(v, dtype=torch.bool))
            assert torch.equal(out.params[k][m], fresh.params[k][m]) and torch.equal(out.params[k][~m], v[~m])
    assert out.params["3.weight"][some["3.weight"]].abs().max() <= 1 / 16  # nn.Linear's bound 1/√fan_in, fan_in 256
    assert not torch.equal(fresh.params["3.weight"][0], fresh.params["3.weight"][1])  # drawn per model seed


@pytest.mark.parametrize("loc", sorted(LOCALISATIONS))
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_weights_outside_the_mask_stay_bit_identical(world, loc, algorithm):
    data, _ = world
    model = original(world)
    theta0 = state(model)
    params = dict(localisation=loc, algorithm=algorithm, weight_decay=5e-2, momentum=0.9)
    task = StackedTask(ModelStack.of([model]), data, FORGET, DELConfig(epochs=1, **params), (0,))
    mask = {k: m[0] for k, m in localisation(task).items()}
    out = state(unlearn(world, model, **params).model)
    for k, v in theta0.items():
        m = mask.get(k, torch.zeros_like(v, dtype=torch.bool))
        assert torch.equal(out[k][~m], v[~m]), k                     # frozen: bit-identical
        assert (out[k][m] != v[m]).float().mean() > 0.9 or not m.any()  # masked: moved


def test_frozen_modules_of_a_batchnorm_model_keep_their_statistics(world):
    model = conv_bn()
    theta0 = state(model)
    out = state(unlearn(world, model, localisation="deepest", budget=0.8, weight_decay=5e-2).model)
    # 0.8 of 646 parameters (516.8): the linear layer (490); a channel of the conv before it (36) does not fit
    assert all(torch.equal(out[k], v) for k, v in theta0.items() if not k.startswith("7."))
    assert not torch.equal(out["7.weight"], theta0["7.weight"])


@pytest.mark.parametrize("loc, algorithm", [(loc, "reset-finetune") for loc in sorted(LOCALISATIONS)]
                         + [("del", "random-label"), ("del", "neggrad+")])
def test_stacked_equals_one_model_at_a_time(world, loc, algorithm):
    data, _ = world
    params = dict(localisation=loc, algorithm=algorithm, epochs=1)
    stack = ModelStack.of([original(world, n) for n in range(N)])
    result = STACKED_METHODS["del"](StackedTask(stack, data, FORGET, DELConfig(**params), tuple(range(N))))
    logits = result.stack.logits(data.all_inputs())
    assert result.stats["sample_grads"] > 0
    for n in range(N):
        one = unlearn(world, original(world, n), **params, seed=n).model
        torch.testing.assert_close(model_logits(one, data.all_inputs()), logits[n], rtol=0, atol=1e-4)


def test_too_small_a_budget_is_one_line(world):
    with pytest.raises(MatchingError) as e:
        unlearn(world, original(world), budget=1e-3)  # 19 parameters: no output channel (65 or 257) fits
    assert "budget 0.001 holds no output channel" in str(e.value) and "\n" not in str(e.value)


def test_dmm_unlearn_runs_del_and_refuses_a_bad_localisation(world, tmp_path, capsys):
    data, _ = world
    trained = engine.train_batched("mlp", data, RECIPE.with_epochs(1), [0], np.ones((1, data.n_train), bool))
    theta0, ids, out = tmp_path / "theta0.safetensors", tmp_path / "forget.txt", tmp_path / "del.safetensors"
    save_model(theta0, trained.state_dict(0), model_meta(data, "mlp", RECIPE, 0))
    ids.write_text(" ".join(map(str, FORGET)))
    files = sorted(tmp_path.iterdir())
    argv = ["unlearn", "--model", str(theta0), "--forget", str(ids), "--out", str(out), "--dataset", "digits",
            "--method", "del", "--set", "epochs=1"]
    assert main([*argv, "--set", "localisation=middle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "localisation 'middle' is not one of del, deepest, shallowest, salloc" in err[0], err
    assert sorted(tmp_path.iterdir()) == files  # wrote nothing
    assert main([*argv, "--set", "localisation=shallowest", "--set", "budget=0.2"]) == 0
    assert f"del forgot {len(FORGET)} ids of digits" in capsys.readouterr().out
    model, meta = load_model(out, data)
    assert meta["unlearned"]["config"]["localisation"] == "shallowest"
    before, _ = load_model(theta0, data)
    assert torch.equal(model.state_dict()["3.weight"], before.state_dict()["3.weight"])  # shallowest: output frozen
