"""The stacked machinery of the baselines (matching/baselines/stack.py, loop.py, per_sample.py) against
independent computations: hand-backpropagated gradients vs autograd, `descend` vs `torch.optim.SGD` on
one `nn.Module` per model, and the factored per-sample gradients vs one autograd call per point."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import matching.baselines.per_sample as per_sample
import matching.baselines.registry as registry
from attribution import engine
from attribution.datasets import load_dataset
from attribution.engine import train_batched
from attribution.models import build_model
from attribution.recipes import default_recipe
from matching.baselines.config import SGDConfig
from matching.baselines.loop import CE, KL, Step, descend, step_loss
from matching.baselines.per_sample import ChainGradients, shared_points
from matching.baselines.stack import ModelStack, StackedTask
from matching.methods import METHOD_CONFIGS, STACKED_METHODS
from test_baselines_more import brute_grads

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, K = 2, 10


def chain(seed: int, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, K))


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits")


def batches(seed: int, n_steps: int, b: int, n_train: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n_train, (N, b), generator=g) for _ in range(n_steps)]


@pytest.mark.parametrize("names", [None, ["3.weight"], ["1.bias", "3.weight", "3.bias"]])
def test_chain_gradients_are_autograds(data, names):
    """gradient_function backpropagates a chain by hand (only down to the lowest named layer): the same
    gradients as autograd through the stacked forward pass, for a loss mixing CE (±) and KL terms."""
    stack = ModelStack.of([chain(0), chain(1)])
    names = list(stack.params) if names is None else names
    idx, other = batches(0, 2, 8, data.n_train)
    teacher = torch.randn(N, 8, K)
    step = Step((CE(idx, data.y_train[idx], 0.7), CE(other, data.y_train[other], -0.3), KL(idx, teacher, 0.5, 2.0)))
    x = data.x_train[torch.cat([idx, other], dim=1)]
    grads = stack.copy().gradient_function(names)(x, step_loss(step, "cpu"))
    params = {k: v.clone().requires_grad_(k in names) for k, v in stack.params.items()}
    expected = torch.autograd.grad(step_loss(step, "cpu")(ModelStack(stack.base, params, {}).forward(x)),
                                   [params[k] for k in names])
    assert len(grads) == len(names)
    for name, got, want in zip(names, grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)


def test_descend_is_torch_sgd_per_model_with_masked_entries_put_back(data):
    """descend over N models = for each model, torch.optim.SGD (momentum, coupled weight decay) on an
    nn.Module with loss Σ terms + l1·‖θ‖₁ over the trained tensors, frozen entries restored after each step."""
    models = [chain(0), chain(1)]
    stack = ModelStack.of(models)
    config = SGDConfig(lr=0.05, momentum=0.9, weight_decay=0.01)
    plan = batches(1, 6, 16, data.n_train)
    steps = [Step((CE(idx, data.y_train[idx], 1.0 if s % 3 else -0.5),), l1=1e-3 * (s % 2))
             for s, idx in enumerate(plan)]
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(stack.params["1.weight"].shape, generator=g) < 0.5
    trainable = {"1.weight": mask, "3.bias": None}
    out = descend(stack, data.x_train, steps, config, trainable)
    for n, model in enumerate(models):
        theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        moving = [model.get_parameter(k) for k in trainable]
        opt = torch.optim.SGD(moving, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        for step, idx in zip(steps, plan):
            term = step.terms[0]
            loss = term.weight * nn.functional.cross_entropy(model(data.x_train[idx[n]]), data.y_train[idx[n]])
            loss = loss + step.l1 * sum(p.abs().sum() for p in moving)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.get_parameter("1.weight").copy_(torch.where(mask[n], model.get_parameter("1.weight"),
                                                                  theta0["1.weight"]))
        for k, v in model.state_dict().items():
            torch.testing.assert_close(out.params[k][n], v, rtol=1e-5, atol=1e-6, msg=k)
        assert torch.equal(out.params["1.weight"][n][~mask[n]], theta0["1.weight"][~mask[n]])
        assert torch.equal(out.params["1.bias"][n], theta0["1.bias"])




def test_factored_gradients_of_per_model_points_are_brute_force(data):
    """Each model its own points (IU's Fisher points): Σ g², G Gᵀ, G v, Gᵀ c per model vs autograd."""
    models = [chain(0), chain(1)]
    idx = torch.stack([torch.arange(0, 60, 3), torch.arange(5, 65, 3)])
    g = ChainGradients(ModelStack.of(models), ["1", "3"], data.x_train, data.y_train, idx)
    torch.manual_seed(3)
    v, c = torch.randn(N, g.squares().shape[1]), torch.randn(N, idx.shape[1])
    for n, model in enumerate(models):
        brute = brute_grads(model, data.x_train[idx[n]], data.y_train[idx[n]])
        torch.testing.assert_close(g.squares()[n], brute.square().sum(0), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(g.gram()[n], brute @ brute.T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g.times(v)[n], brute @ v[n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g.transpose_times(c)[n], c[n] @ brute, rtol=1e-4, atol=1e-5)


def test_squares_in_chunks_of_points_equal_one_pass(data, monkeypatch):
    stack = ModelStack.of([chain(0), chain(1)])
    ids = np.arange(0, 500, 7)
    whole = ChainGradients(stack, ["1", "3"], data.x_train, data.y_train, shared_points(ids, N)).squares()
    monkeypatch.setattr(per_sample, "CHUNK_FLOATS", 2 * N * (64 + 16 + 16 + K))  # two points a chunk
    torch.testing.assert_close(per_sample.squares(stack, data.x_train, data.y_train, ids), whole,
                               rtol=1e-5, atol=1e-8)


@pytest.fixture(scope="module")
def three_originals(data):
    trained = train_batched("mlp", data, default_recipe("digits", "mlp"), [0, 1, 2], np.ones((3, data.n_train), bool))
    return ModelStack(build_model("mlp", data.input_shape, data.num_classes, 0).to("meta"), dict(trained.state), {})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("name", sorted(STACKED_METHODS))
def test_a_stacked_run_gives_each_model_bitwise_what_it_gets_alone(data, three_originals, name, device):
    """With one torch thread, every stackable method's N models are bitwise the N = 1 runs (`dmm unlearn`'s):
    no op mixes models, and none rounds a model's values by where they sit in the stack. F = every 29th id
    leaves a last batch of 43 retain points, which a class-major CE over all N·b points rounded otherwise.
    On a GPU this holds through the full-width groups (`registry.in_full_groups`)."""
    torch.set_num_threads(1)
    forget, recipe, config = np.arange(0, data.n_train, 29), default_recipe("digits", "mlp"), METHOD_CONFIGS[name]()
    originals = ModelStack(three_originals.base, {k: v.to(device) for k, v in three_originals.params.items()}, {})
    together = STACKED_METHODS[name](StackedTask(originals, data, forget, config, (0, 1, 2), "mlp", recipe))
    for n in range(3):
        alone = ModelStack(originals.base, {k: v[n:n + 1].clone() for k, v in originals.params.items()}, {})
        result = STACKED_METHODS[name](StackedTask(alone, data, forget, config, (n,), "mlp", recipe))
        for k, v in result.stack.params.items():
            assert torch.equal(together.stack.params[k][n], v[0]), f"{name}: model {n}'s {k}"


def test_full_groups_give_each_model_what_it_gets_unpadded(data, three_originals, monkeypatch):
    """The GPU's full-width groups (`in_full_groups`) forced on the CPU at width 2: three models run as groups
    [0, 1] and [2, 2] with their own seeds (the copy takes model 2's), the copy is dropped, and every model's
    parameters and the stats are bitwise the unpadded run's."""
    seen = []

    def recording(task):
        seen.append((task.seeds, [torch.equal(task.stack.params["1.bias"][i], three_originals.params["1.bias"][n])
                                  for i, n in enumerate(task.seeds)]))
        return STACKED_METHODS["finetune"](task)

    forget, recipe = np.arange(0, data.n_train, 29), default_recipe("digits", "mlp")
    task = StackedTask(three_originals, data, forget, METHOD_CONFIGS["finetune"](), (0, 1, 2), "mlp", recipe)
    plain = STACKED_METHODS["finetune"](task)
    monkeypatch.setattr(engine, "FULL_GROUP_DEVICES", ("cpu",))
    monkeypatch.setattr(registry, "GROUP_WIDTH", 2)
    padded = registry.in_full_groups(recording)(task)
    assert seen == [((0, 1), [True, True]), ((2, 2), [True, True])]
    assert padded.stats == plain.stats
    for k, v in plain.stack.params.items():
        assert padded.stack.params[k].shape == v.shape and torch.equal(padded.stack.params[k], v), k
