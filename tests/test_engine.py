"""The one-model trainer and the model-batched engine: same recipe semantics, masks respected."""
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from attribution.datasets import load_dataset
from torch.func import stack_module_state

from attribution import engine
from attribution.engine import TrainingError, derive_seeds, train_batched, train_model
from attribution.grouped_mlp import GroupedMLP, linear_chain
from attribution.models import MATMUL_MAX_BATCH, MatmulConv1d, WindowedConv1d, build_model, mlp
from attribution.evaluation import accuracy, margins, model_logits
from attribution.recipes import Recipe, RecipeError, default_recipe


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def short(recipe: Recipe, epochs=3) -> Recipe:
    peak = min(recipe.peak_epoch, epochs / 2)
    return replace(recipe, epochs=epochs, peak_epoch=peak)


def unequal_masks(n, sizes, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((len(sizes), n), dtype=bool)
    for row, size in zip(masks, sizes):
        row[rng.choice(n, size, replace=False)] = True
    return masks


def max_param_diff(model: nn.Module, state: dict, b: int) -> float:
    return max((v - state[k][b]).abs().max().item() for k, v in model.state_dict().items())


RECIPES = {
    "sgd-nesterov-onecycle": default_recipe("digits"),
    "sgd-plain-constant": Recipe(epochs=3, batch_size=50, optimizer="sgd", lr=0.05, momentum=0.0,
                                 nesterov=False, weight_decay=1e-3, schedule="constant"),
    "adam-cosine-smoothing": Recipe(epochs=3, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=1e-4,
                                    schedule="cosine", label_smoothing=0.1),
}


@pytest.mark.parametrize("name", RECIPES)
def test_batched_equals_one_model_trainer(digits, name):
    recipe = short(RECIPES[name])
    masks = unequal_masks(digits.n_train, [700, 300, 1437, 64 * 5 + 1])  # unequal, incl. a 1-point last batch
    seeds = [11, 12, 13, 14]
    result = train_batched("mlp", digits, recipe, seeds, masks)
    for b, (seed, mask) in enumerate(zip(seeds, masks)):
        model = train_model("mlp", digits, recipe, seed, mask)
        assert max_param_diff(model, result.state, b) < 1e-4
        expected = model_logits(model, digits.all_inputs())
        assert torch.allclose(result.logits[b], expected, atol=1e-4)


def test_grouped_mlp_on_image_shaped_inputs_equals_one_model_trainer(digits):
    images = replace(digits, x_train=digits.x_train.view(-1, 1, 8, 8), x_test=digits.x_test.view(-1, 1, 8, 8))
    recipe = short(default_recipe("digits"), epochs=2)
    masks = unequal_masks(images.n_train, [500, 800])
    result = train_batched("mlp", images, recipe, [5, 6], masks)
    for b, (seed, mask) in enumerate(zip([5, 6], masks)):
        model = train_model("mlp", images, recipe, seed, mask)
        assert max_param_diff(model, result.state, b) < 1e-4
        assert torch.allclose(result.logits[b], model_logits(model, images.all_inputs()), atol=1e-4)


def test_batched_equals_one_model_for_a_cnn(digits):
    recipe = short(default_recipe("digits"), epochs=2)
    masks = unequal_masks(digits.n_train, [400, 900])
    result = train_batched("cnn1d", digits, recipe, [3, 4], masks)
    for b, (seed, mask) in enumerate(zip([3, 4], masks)):
        assert max_param_diff(train_model("cnn1d", digits, recipe, seed, mask), result.state, b) < 1e-4


@pytest.mark.parametrize("k, stride, pad", [(3, 2, 1), (5, 1, 2), (1, 3, 0)])
def test_the_matmul_convolution_is_nn_conv1d(k, stride, pad):
    """cnn1d's MatmulConv1d: nn.Conv1d's init under one seed, its outputs and gradients (also per sample
    under vmap, as the engine and TRAK take them), and nn.Conv1d's own kernel above MATMUL_MAX_BATCH."""
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 4, k, stride=stride, padding=pad)
    torch.manual_seed(0)
    ours = MatmulConv1d(3, 4, k, stride=stride, padding=pad)
    assert all(torch.equal(a, b) for a, b in zip(conv.parameters(), ours.parameters()))
    x = torch.randn(MATMUL_MAX_BATCH + 1, 3, 17, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours(x), conv(x))
    x = x[:MATMUL_MAX_BATCH]
    grads = []
    for layer in (conv, ours):
        xg = x.clone().requires_grad_()
        out = layer(xg)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        grads.append((out.detach(), xg.grad, layer.weight.grad, layer.bias.grad))
    for expected, got in zip(*grads):
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    per_sample = torch.func.vmap(lambda xi: ours(xi.unsqueeze(0)).squeeze(0))(x)
    assert torch.allclose(per_sample, grads[0][0], atol=1e-5)
    # per-sample input gradients under vmap(grad), as the engine's stacked models take them: every op has a
    # batching rule (unfold's backward has none: torch warns and loops over the batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_sample_grad = torch.func.vmap(torch.func.grad(lambda xi: ours(xi.unsqueeze(0)).square().sum()))(x[:8])
    for i in range(8):
        xi = x[i:i + 1].clone().requires_grad_()
        ours(xi).square().sum().backward()
        assert torch.allclose(per_sample_grad[i], xi.grad[0], atol=1e-5)
    for unsupported in ({"dilation": 2}, {"groups": 3}, {"bias": False}):  # what the matmul does not compute
        with pytest.raises(TypeError):
            MatmulConv1d(3, 3, k, **unsupported)


def test_the_windowed_convolution_is_the_matmul_convolution_on_precomputed_windows():
    """WindowedConv1d on a MatmulConv1d's windows (computed once, as the matching does on frozen inputs): the same
    outputs and parameter gradients to the bit, on the convolution's own parameters (none of its own)."""
    torch.manual_seed(0)
    conv = MatmulConv1d(4, 5, 3, stride=2, padding=1)
    windowed = WindowedConv1d(conv)
    assert [id(p) for p in windowed.parameters()] == [id(p) for p in conv.parameters()]
    x = torch.randn(MATMUL_MAX_BATCH, 4, 11)
    windows = conv.windows(x)
    assert windows.shape == (MATMUL_MAX_BATCH, 6, 3 * 4)
    assert torch.equal(windows[2, 1].view(3, 4), torch.nn.functional.pad(x, (1, 1))[2, :, 2:5].T)  # window l: 2l..2l+2
    grads = []
    for layer, inputs in ((conv, x), (windowed, windows)):
        conv.zero_grad()
        out = layer(inputs)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        grads.append((out.detach(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    for expected, got in zip(*grads):
        assert torch.equal(got, expected)


def test_grouped_mlp_gradients_equal_autograd_model_by_model(digits):
    torch.manual_seed(0)
    models = [mlp(digits.input_shape, digits.num_classes, hidden=(16, 8)) for _ in range(3)]
    params, _ = stack_module_state(models)
    grouped = GroupedMLP({k: v.detach() for k, v in params.items()}, linear_chain(models[0]))
    x = digits.x_train[:30].view(3, 10, -1)
    y = digits.y_train[:30].view(3, 10)
    w = torch.full((3, 10), 0.1)
    w[1] = torch.tensor([1 / 7] * 7 + [0] * 3)  # a short batch: 7 real slots, 3 padded
    grads = grouped.gradients(x, y, w, label_smoothing=0.1)
    names = [f"{n}.weight" for n in grouped.layers] + [f"{n}.bias" for n in grouped.layers]
    for b, model in enumerate(models):
        keep = w[b] > 0
        nn.functional.cross_entropy(model(x[b][keep]), y[b][keep], label_smoothing=0.1).backward()
        expected = dict(model.named_parameters())
        for name, g in zip(names, grads):
            g = g[b] if name.endswith("weight") else g[b].squeeze(1)
            assert torch.allclose(g, expected[name].grad, atol=1e-6), name


def test_only_linear_relu_chains_take_the_grouped_path(digits):
    shape, k = digits.input_shape, digits.num_classes
    assert linear_chain(mlp(shape, k, hidden=(16, 8))) == ["1", "3", "5"]
    assert linear_chain(build_model("cnn1d", shape, k, 0)) is None
    assert linear_chain(nn.Sequential(nn.Flatten(), nn.Linear(64, k, bias=False))) is None
    assert linear_chain(nn.Sequential(nn.Flatten(), nn.Linear(64, k), nn.ReLU())) is None
    assert linear_chain(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, k))) is None
    assert linear_chain(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, k))) is None  # Linear acts on the last axis
    assert linear_chain(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.ReLU(), nn.Linear(8, k))) is None


@pytest.mark.parametrize("threads", [1, 2])
def test_result_does_not_depend_on_the_grouping(digits, threads):
    """Bitwise with one thread; with more, MKL may split a small group's matmuls otherwise (≈ 1e-7)."""
    torch.set_num_threads(threads)  # restored after the test (conftest)
    recipe = short(default_recipe("digits"), 2)
    masks = unequal_masks(digits.n_train, [300, 500, 700, 900, 1100])
    seeds = [1, 2, 3, 4, 5]
    one = train_batched("mlp", digits, recipe, seeds, masks, group_size=5)
    split = train_batched("mlp", digits, recipe, seeds, masks, group_size=2)
    tol = dict(rtol=0, atol=0) if threads == 1 else dict(rtol=1e-5, atol=1e-5)
    for k in one.state:
        torch.testing.assert_close(split.state[k], one.state[k], **tol)
    torch.testing.assert_close(split.logits, one.logits, **tol)


def test_padding_the_last_group_to_full_width_changes_no_model(digits, monkeypatch):
    """The GPU's padding (copies of the last model fill the last group) run on the CPU: the real models'
    states and logits are bitwise those of the unpadded run (one thread), and the copies are dropped."""
    torch.set_num_threads(1)  # restored after the test (conftest)
    recipe = short(default_recipe("digits"), 2)
    masks = unequal_masks(digits.n_train, [300, 500, 700])
    plain = train_batched("mlp", digits, recipe, [1, 2, 3], masks, group_size=2)
    monkeypatch.setattr(engine, "FULL_GROUP_DEVICES", ("cpu",))
    padded = []
    real = engine._train_group
    monkeypatch.setattr(engine, "_train_group", lambda models, *a: padded.append(len(models)) or real(models, *a))
    full = train_batched("mlp", digits, recipe, [1, 2, 3], masks, group_size=2)
    assert padded == [2, 2]
    assert full.logits.shape[0] == 3 and all(v.shape[0] == 3 for v in full.state.values())
    assert torch.equal(full.logits, plain.logits)
    assert all(torch.equal(full.state[k], plain.state[k]) for k in plain.state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_an_mlp_does_not_depend_on_how_many_models_train_with_it(digits):
    recipe = short(default_recipe("digits"), 5)
    masks = unequal_masks(digits.n_train, [900, 1000, 1100])
    together = train_batched("mlp", digits, recipe, [1, 2, 3], masks, device="cuda")
    for b, seed in enumerate([1, 2, 3]):
        alone = train_batched("mlp", digits, recipe, [seed], masks[b:b + 1], device="cuda")
        assert torch.equal(alone.logits[0], together.logits[b])
        assert all(torch.equal(alone.state[k][0], together.state[k][b]) for k in alone.state)


def test_no_gradient_from_points_outside_the_mask(digits):
    masks = unequal_masks(digits.n_train, [500, 700], seed=3)
    excluded = ~masks.any(0)
    x_train = digits.x_train.clone()
    x_train[torch.from_numpy(excluded)] = float("nan")
    # make_dataset refuses NaN inputs (rightly), so build the poisoned dataset by hand
    poisoned = replace(digits, x_train=x_train)
    recipe = short(default_recipe("digits"))
    result = train_batched("mlp", poisoned, recipe, [0, 1], masks)
    for v in result.state.values():
        assert torch.isfinite(v).all()
    clean = train_batched("mlp", digits, recipe, [0, 1], masks)
    for k in clean.state:
        assert torch.equal(clean.state[k], result.state[k])
    one = train_model("mlp", poisoned, recipe, 0, masks[0])
    assert all(torch.isfinite(p).all() for p in one.parameters())


def test_labels_outside_the_mask_do_not_matter(digits):
    mask = unequal_masks(digits.n_train, [600], seed=5)[0]
    relabelled = digits.y_train.clone()
    relabelled[torch.from_numpy(~mask)] = (relabelled[torch.from_numpy(~mask)] + 1) % 10
    other = replace(digits, y_train=relabelled)
    recipe = short(default_recipe("digits"))
    a = train_model("mlp", digits, recipe, 7, mask).state_dict()
    b = train_model("mlp", other, recipe, 7, mask).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_digits_mlp_reaches_95_percent(digits):
    model = train_model("mlp", digits, default_recipe("digits"), seed=0)
    assert accuracy(model_logits(model, digits.x_test), digits.y_test) >= 0.95


def test_same_seed_same_bytes_other_seed_other_model(digits):
    recipe = short(default_recipe("digits"))
    a = train_model("mlp", digits, recipe, 5).state_dict()
    b = train_model("mlp", digits, recipe, 5).state_dict()
    c = train_model("mlp", digits, recipe, 6).state_dict()
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    masks = unequal_masks(digits.n_train, [700, 700])
    r1 = train_batched("mlp", digits, recipe, [1, 2], masks)
    r2 = train_batched("mlp", digits, recipe, [1, 2], masks)
    assert r1.logits.numpy().tobytes() == r2.logits.numpy().tobytes()


def test_global_rng_is_left_alone(digits):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_model("mlp", digits, short(default_recipe("digits"), 1), seed=9)
    assert torch.equal(torch.rand(3), expected)


def bn_mlp(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, num_classes))


def test_a_batchnorm_mlp_trains_batched_as_one_model_does(digits):
    """BatchNorm1d on (batch, features): per-model batch statistics, short last batches (300 = 4·64 + 44)
    included, and per-model running statistics, used by the eval-mode logits."""
    recipe = short(default_recipe("digits"), 2)
    masks = unequal_masks(digits.n_train, [300, 500, 900])
    seeds = [0, 1, 2]
    name = "test_engine:bn_mlp"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batched: no one-at-a-time fallback
        result = train_batched(name, digits, recipe, seeds, masks)
    x_all = digits.all_inputs()
    for b, (seed, mask) in enumerate(zip(seeds, masks)):  # model b: its own seed and subset, buffers included
        model = train_model(name, digits, recipe, seed, mask)
        state = model.state_dict()
        assert set(result.state) == set(state) and "2.running_mean" in state
        for k, v in state.items():
            torch.testing.assert_close(result.state[k][b], v, rtol=0, atol=1e-4, msg=f"model {b}, {k}")
        with torch.no_grad():  # eval mode: running statistics, so a point's logits do not depend on its batch
            expected = torch.cat([model(x) for x in x_all.split(100)])
        torch.testing.assert_close(result.logits[b], expected, rtol=0, atol=1e-4)
    assert not torch.equal(result.state["2.running_mean"][0], result.state["2.running_mean"][1])


def test_bad_masks_and_seeds_are_refused(digits):
    recipe = short(default_recipe("digits"), 1)
    with pytest.raises(TrainingError, match="boolean vector"):
        train_model("mlp", digits, recipe, 0, np.ones(10, dtype=bool))
    with pytest.raises(TrainingError, match="no training point"):
        train_model("mlp", digits, recipe, 0, np.zeros(digits.n_train, dtype=bool))
    with pytest.raises(TrainingError, match="one seed per row"):
        train_batched("mlp", digits, recipe, [0], np.ones((2, digits.n_train), dtype=bool))
    with pytest.raises(TrainingError, match="group_size"):
        train_batched("mlp", digits, recipe, [0], np.ones((1, digits.n_train), dtype=bool), group_size=0)


@pytest.mark.parametrize("changes, match", [
    ({"optimizer": "rmsprop"}, "unknown optimizer"),
    ({"schedule": "step"}, "unknown schedule"),
    ({"epochs": 0}, "epochs"),
    ({"lr": -1.0}, "lr > 0"),
    ({"peak_epoch": 30}, "peak_epoch"),
])
def test_bad_recipes_are_refused(changes, match):
    with pytest.raises(RecipeError, match=match):
        Recipe(**{**Recipe().to_dict(), **changes})


def test_schedules_by_hand():
    one = Recipe(epochs=4, peak_epoch=1, schedule="onecycle")
    assert [one.lr_factor(t, 8) for t in range(9)] == [0, 0.5, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0]
    cos = Recipe(schedule="cosine")
    assert cos.lr_factor(0, 10) == 1 and abs(cos.lr_factor(5, 10) - 0.5) < 1e-12
    assert Recipe(schedule="constant").lr_factor(7, 10) == 1
    assert Recipe.from_dict(one.to_dict()) == one


def test_derived_seeds_differ_and_are_stable():
    assert derive_seeds(3) == derive_seeds(3) and derive_seeds(3) != derive_seeds(4)
    init, order = derive_seeds(3)
    assert init != order


def test_margins_and_accuracy_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 1])
    expected = torch.tensor([2 - math.log(2), 1 - math.log(1 + math.exp(3))])
    assert torch.allclose(margins(logits, labels), expected)
    batched = margins(torch.stack([logits, logits]), labels)
    assert batched.shape == (2, 2) and torch.allclose(batched[1], expected)
    assert accuracy(logits, labels) == 0.5
    assert accuracy(logits, labels, [0]) == 1.0 and accuracy(logits, labels, [1]) == 0.0
