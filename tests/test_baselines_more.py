"""SSD, IU, Boundary Shrink / Expanding and PRU (matching/baselines): the property that defines each,
checked against a brute-force computation, and the stacked run against one model at a time."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import attribution.engine as engine
from attribution.checkpoint import load_model, model_meta, save_model
from attribution.datasets import load_dataset
from attribution.evaluation import model_logits
from attribution.models import build_model
from attribution.recipes import RECIPES
from cluster.cli import main
from cluster.eval_methods import load_model_from_state
from matching.baselines.boundary import nearest_wrong_labels, output_layer, widened
from matching.baselines.per_sample import ChainGradients, SampleGradients, gradients, shared_points
from matching.baselines.pru import leave_out_predictions, projective_residual_update, working_targets
from matching.baselines.ssd import diagonal_fisher
from matching.baselines.stack import ModelStack, StackedTask
from matching.errors import MatchingError
from matching.methods import METHOD_CONFIGS, METHODS, STACKED_METHODS, UnlearnTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORGET = np.arange(0, 1400, 28)  # 50 training ids
RECIPE = RECIPES["digits-mlp"].with_epochs(4)
NEW = ("ssd", "iu", "boundary-shrink", "boundary-expand")


@pytest.fixture(scope="module")
def world():
    data = load_dataset("digits")
    originals = engine.train_batched("mlp", data, RECIPE, [0, 1], np.ones((2, data.n_train), bool))
    return data, originals


def original(world, n: int = 0) -> nn.Module:
    data, originals = world
    return load_model_from_state("mlp", data, originals.state_dict(n))


def run_method(world, name: str, model: nn.Module | None = None, **params):
    data, _ = world
    model = original(world) if model is None else model
    task = UnlearnTask(model=model, data=data, forget_ids=FORGET, store=None, original_logits=None,
                       config=METHOD_CONFIGS[name](**params), model_name="mlp", recipe=RECIPE)
    return METHODS[name](task)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def brute_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-point CE gradients (m, P), one autograd call per point."""
    rows = []
    for xi, yi in zip(x, y):
        loss = nn.functional.cross_entropy(model(xi.unsqueeze(0)), yi.unsqueeze(0))
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


def test_new_methods_are_registered_with_documented_frozen_configs():
    assert set(NEW) <= set(STACKED_METHODS) and "pru" in METHODS and "pru" not in STACKED_METHODS
    for name in (*NEW, "pru"):
        cls = METHOD_CONFIGS[name]
        assert cls.__dataclass_params__.frozen and all(f.metadata.get("doc") for f in dataclasses.fields(cls))
        assert cls().to_dict() == dataclasses.asdict(cls())
    assert (METHOD_CONFIGS["ssd"]().alpha, METHOD_CONFIGS["ssd"]().dampening) == (10.0, 1.0)  # the paper's


@pytest.mark.parametrize("name, params, needle", [
    ("ssd", {"alpha": 0.0}, "alpha 0.0 must be > 0; e.g. --set alpha=10"),
    ("iu", {"damping": -1.0}, "damping -1.0 must be > 0"),
    ("boundary-shrink", {"epsilon": 0.0}, "epsilon 0.0 must be > 0"),
    ("pru", {"weight_decay": -2.0}, "weight_decay -2.0 must be >= 0, or -1 for the recipe's"),
])
def test_bad_hyperparameters_are_one_line_errors(name, params, needle):
    with pytest.raises(MatchingError) as e:
        METHOD_CONFIGS[name](**params)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_gradient_products_equal_brute_force_on_chains_and_other_models(world):
    """Σ g², G Gᵀ, G v and Gᵀ c of both forms of G (factored for chains, chunked otherwise) vs autograd."""
    data, _ = world
    torch.manual_seed(0)
    ids = FORGET[:20]
    x, y = data.x_train[ids], data.y_train[ids]
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))  # not a linear chain
    for model, form in ((original(world), ChainGradients), (tanh, SampleGradients)):
        g = gradients(ModelStack.of([model]), data.x_train, data.y_train, shared_points(ids, 1))
        brute = brute_grads(model, x, y)
        v, c = torch.randn(1, brute.shape[1]), torch.randn(1, len(ids))
        assert isinstance(g, form)
        torch.testing.assert_close(g.squares()[0], brute.square().sum(0), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(g.gram()[0], brute @ brute.T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g.times(v)[0], brute @ v[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g.transpose_times(c)[0], c[0] @ brute, rtol=1e-4, atol=1e-5)


def test_ssd_dampens_exactly_the_specialised_parameters(world):
    data, _ = world
    model = original(world)
    alpha, lam = 2.0, 0.5  # α lower than the paper's so that a random F selects many parameters on digits
    out = flat(run_method(world, "ssd", model, alpha=alpha, dampening=lam).model)
    theta = flat(model)
    stack = ModelStack.of([model])
    i_f = diagonal_fisher(stack, data.x_train, data.y_train, FORGET)[0]
    i_s = diagonal_fisher(stack, data.x_train, data.y_train, np.arange(data.n_train))[0]
    brute_f = brute_grads(model, data.x_train[FORGET], data.y_train[FORGET]).square().mean(0)
    torch.testing.assert_close(i_f, brute_f, rtol=1e-4, atol=1e-9)
    selected = i_f > alpha * i_s
    assert 0 < int(selected.sum()) < selected.numel()
    assert torch.equal(out[~selected], theta[~selected])  # bit-identical
    beta = torch.clamp(lam * i_s[selected] / i_f[selected], max=1.0)
    torch.testing.assert_close(out[selected], beta * theta[selected], rtol=1e-6, atol=0)


def test_iu_is_the_newton_step_with_the_damped_empirical_fisher(world):
    data, _ = world
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 10))
    damping = 1e-2
    out = flat(run_method(world, "iu", tiny, damping=damping, fisher_samples=0).model).double()
    g = brute_grads(tiny, data.x_train, data.y_train).double()  # all of S
    n = data.n_train
    hessian = damping * torch.eye(g.shape[1], dtype=torch.float64) + g.T @ g / n
    v = g[FORGET].sum(0) / n
    expected = flat(tiny).double() + torch.linalg.solve(hessian, v)
    step = expected - flat(tiny).double()
    assert step.abs().max() > 1e-3
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4 * step.abs().max().item())


def test_iu_fisher_points_are_a_seeded_subset(world):
    data, _ = world
    first = run_method(world, "iu", fisher_samples=300, seed=1).model
    again = run_method(world, "iu", fisher_samples=300, seed=1).model
    other = run_method(world, "iu", fisher_samples=300, seed=2).model
    assert torch.equal(flat(first), flat(again)) and not torch.equal(flat(first), flat(other))


def test_boundary_shrink_labels_are_the_fgsm_neighbours_nearest_wrong_class(world):
    data, _ = world
    models = [original(world, 0), original(world, 1)]
    x, y = data.x_train[FORGET], data.y_train[FORGET]
    epsilon = 0.1  # digits pixels lie in [0, 1]
    labels = nearest_wrong_labels(ModelStack.of(models), x, y, epsilon, (0.0, 1.0))
    assert labels.shape == (2, len(FORGET)) and (labels != y).all()
    crossed = 0
    for n, model in enumerate(models):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(xr), y, reduction="sum"), xr)
        with torch.no_grad():
            logits = model((x + epsilon * g.sign()).clamp(0, 1))
        argmax = logits.argmax(1)
        crossed += int((argmax != y).sum())
        assert torch.equal(labels[n][argmax != y], argmax[argmax != y])  # where FGSM crossed: its argmax
        logits[torch.arange(len(y)), y] = float("-inf")
        assert torch.equal(labels[n], logits.argmax(1))                    # everywhere: the argmax over c ≠ y
    assert crossed > 0


def test_boundary_shrink_moves_forget_points_off_their_class(world):
    data, _ = world
    model = original(world)
    out = run_method(world, "boundary-shrink", model, lr=0.01).model
    f = data.x_train[FORGET], data.y_train[FORGET]
    accuracy = [(model_logits(m, f[0]).argmax(1) == f[1]).float().mean() for m in (model, out)]
    assert accuracy[1] < accuracy[0] - 0.1


def test_boundary_expand_trains_a_shadow_class_and_returns_k_classes(world):
    data, _ = world
    model = original(world)
    stack = ModelStack.of([model])
    task = StackedTask(stack, data, FORGET, METHOD_CONFIGS["boundary-expand"](), (0,))
    wide = widened(task, output_layer(stack.base, 10))
    assert wide.logits(data.x_train[:5]).shape == (1, 5, 11)
    assert torch.equal(wide.params["3.weight"][:, :10], stack.params["3.weight"])
    out = run_method(world, "boundary-expand", model, lr=0.01).model
    assert model_logits(out, data.x_train[:5]).shape == (5, 10)
    assert {k: v.shape for k, v in out.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    before = model_logits(model, data.x_train[FORGET]).argmax(1) == data.y_train[FORGET]
    after = model_logits(out, data.x_train[FORGET]).argmax(1) == data.y_train[FORGET]
    assert after.float().mean() < before.float().mean() - 0.1
    with pytest.raises(MatchingError, match="last nn.Linear must output the 10 classes"):
        output_layer(nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 5)), 10)


def ridge(x: torch.Tensor, t: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ t)


def test_pru_is_the_exact_leave_out_ridge_solution_when_forget_features_are_disjoint():
    gen = torch.Generator().manual_seed(0)
    n, d, k, lam = 200, 12, 3, 0.5
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    forget = np.arange(0, 40, 5)
    x[forget, :8] = 0                                    # F uses features 8..11 only ...
    x[np.setdiff1d(np.arange(n), forget), 8:] = 0        # ... which no retained point uses
    t = torch.randn(n, k, generator=gen, dtype=torch.float64)
    theta = ridge(x, t, lam)
    keep = np.setdiff1d(np.arange(n), forget)
    exact = ridge(x[keep], t[keep], lam)
    torch.testing.assert_close(projective_residual_update(x, t, theta, lam, forget), exact, rtol=0, atol=1e-4)


def test_pru_lands_on_the_exact_leave_out_predictions_in_general():
    gen = torch.Generator().manual_seed(1)
    n, d, k, lam = 150, 20, 4, 0.1
    x, t = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, k, generator=gen, dtype=torch.float64)
    forget = np.array([3, 17, 40, 99])
    keep = np.setdiff1d(np.arange(n), forget)
    theta, exact = ridge(x, t, lam), ridge(x[keep], t[keep], lam)
    torch.testing.assert_close(leave_out_predictions(x, t, theta, lam, forget), x[forget] @ exact, rtol=0, atol=1e-8)
    new = projective_residual_update(x, t, theta, lam, forget)
    torch.testing.assert_close(x[forget] @ new, x[forget] @ exact, rtol=0, atol=1e-8)
    assert (new - exact).norm() < (theta - exact).norm()  # the projection of the exact update helps


def fit_linear(data, ids, weight_decay: float) -> torch.Tensor:
    """θ ((d+1) × k, float64) minimising mean CE + (w/2)‖θ‖² on `ids` (the optimum SGD's coupled decay targets)."""
    x = torch.cat([data.x_train[ids].double(), torch.ones(len(ids), 1, dtype=torch.float64)], 1)
    theta = torch.zeros(x.shape[1], data.num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ theta, data.y_train[ids]) + weight_decay / 2 * theta.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    return theta.detach()


def test_pru_on_the_linear_model_is_the_ridge_pru_of_its_working_targets(world):
    data, _ = world
    w = 1e-2
    theta0 = fit_linear(data, np.arange(data.n_train), w)
    x = torch.cat([data.x_train.double(), torch.ones(data.n_train, 1, dtype=torch.float64)], 1)
    targets = working_targets(x @ theta0, data.y_train, 0.0)
    torch.testing.assert_close(ridge(x, targets, data.n_train * w), theta0, rtol=0, atol=1e-5)  # θ0 solves it
    model = build_model("linear", data.input_shape, data.num_classes, 0)
    with torch.no_grad():
        model[1].weight.copy_(theta0[:-1].T)
        model[1].bias.copy_(theta0[-1])
    out = run_method(world, "pru", model, weight_decay=w, label_smoothing=0.0).model
    new = torch.cat([out[1].weight.detach().T, out[1].bias.detach().unsqueeze(0)]).double()
    expected = projective_residual_update(x, targets, theta0, data.n_train * w, FORGET)
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-5)
    retrained = fit_linear(data, np.setdiff1d(np.arange(data.n_train), FORGET), w)
    assert (new - retrained).norm() < (theta0 - retrained).norm()


def test_pru_refuses_non_linear_models_in_one_line(world):
    with pytest.raises(MatchingError) as e:
        run_method(world, "pru", weight_decay=5e-4, label_smoothing=0.0)
    assert "pru is for linear models only; train a `linear` model" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name, params", [("ssd", {"alpha": 2.0}), ("iu", {"fisher_samples": 200}),
                                          ("boundary-shrink", {"epochs": 2}), ("boundary-expand", {"epochs": 2})])
def test_stacked_equals_one_model_at_a_time(world, name, params):
    data, _ = world
    models = [original(world, 0), original(world, 1)]
    config = METHOD_CONFIGS[name](**params)
    stacked = STACKED_METHODS[name](StackedTask(ModelStack.of(models), data, FORGET, config, (0, 1)))
    logits = stacked.stack.logits(data.all_inputs())
    for n, model in enumerate(models):  # brute force: one model, seed n, through the registered one-model method
        one = run_method(world, name, model, **{**params, "seed": n}).model
        torch.testing.assert_close(model_logits(one, data.all_inputs()), logits[n], rtol=0, atol=1e-4)


@pytest.mark.parametrize("model_name, method, sets", [("mlp", "iu", ["fisher_samples=100"]),
                                                      ("mlp", "boundary-expand", ["epochs=1", "lr=0.01"]),
                                                      ("linear", "pru", [])])
def test_dmm_unlearn_runs_them_from_the_command_line(world, tmp_path, capsys, model_name, method, sets):
    data, _ = world
    trained = engine.train_batched(model_name, data, RECIPE.with_epochs(1), [0], np.ones((1, data.n_train), bool))
    theta0, ids, out = tmp_path / "theta0.safetensors", tmp_path / "forget.txt", tmp_path / "out.safetensors"
    save_model(theta0, trained.state_dict(0), model_meta(data, model_name, RECIPE, 0))  # pru reads its recipe
    ids.write_text(" ".join(map(str, FORGET)))
    sets = [a for s in sets for a in ("--set", s)]
    assert main(["unlearn", "--model", str(theta0), "--forget", str(ids), "--out", str(out), "--dataset", "digits",
                 "--method", method, *sets]) == 0
    assert f"{method} forgot {len(FORGET)} ids of digits" in capsys.readouterr().out
    model, meta = load_model(out, data)
    assert meta["unlearned"]["method"] == method and model_logits(model, data.x_train[:3]).shape == (3, 10)
