"""BatchNorm models trained batched (issue 15): per-model batch statistics over the real slots of a padded
step, per-model running statistics, and the batched ResNet-9 equal to the one-model trainer; modules vmap
cannot run fall back to one model at a time, with a warning that names them."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import stack_module_state

import attribution.engine as engine
from attribution.batched_norm import StackedForward, masked_batch_norm
from attribution.datasets import make_dataset
from attribution.engine import group_size_for, train_batched, train_model
from attribution.evaluation import model_logits
from attribution.folded import Folded
from attribution.models import resnet9
from attribution.recipes import RECIPES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_resnet9(input_shape, num_classes):
    return resnet9(input_shape, num_classes, width=8)


MODEL = "test_engine_batchnorm:small_resnet9"
# The ResNet-9 recipe (flip, translate by 2) on 8-image batches, lr 0.05. The two trainers agree to float
# rounding step by step; but a max-pool or ReLU kink makes a step's gradient jump (by 1e-2 here) when rounding
# moves an activation across it — then the one-model trainer disagrees with itself under a 1e-8 perturbation.
# Which seeds cross one in float32 depends on the CPU's kernels (seeds 30–32 crossed none on one machine, seed 30
# did, by 5e-4, on an AVX-512 one), so the trainers are compared in float64, where no run here crosses one.
RECIPE = RECIPES["cifar10-resnet9"].with_(batch_size=8, lr=0.05).with_epochs(2)
SEEDS = [30, 31, 32]


@pytest.fixture(scope="module")
def tiny_cifar():
    """24 CIFAR-format training images (3 × 16 × 16), 4 classes, 8 held out."""
    rng = np.random.default_rng(0)
    return make_dataset("tiny-cifar", rng.normal(size=(24, 3, 16, 16)), rng.integers(0, 4, 24),
                        rng.normal(size=(8, 3, 16, 16)), rng.integers(0, 4, 8), num_classes=4)


@pytest.fixture
def float64():
    """New models in float64 for one test (RECIPE's comment), float32 again after it."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def subsets(sizes, n=24, seed=1):
    rng = np.random.default_rng(seed)
    masks = np.zeros((len(sizes), n), dtype=bool)
    for row, size in zip(masks, sizes):
        row[rng.choice(n, size, replace=False)] = True
    return masks


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(8, 3, 4, 5), (8, 3)])
def test_masked_batch_norm_equals_nn_batchnorm_on_each_models_real_slots(shape, momentum):
    """Three models folded into one tensor's channels: every slot real, 5 of 8 real, none real (idle)."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
    modules = [norm(shape[1], momentum=momentum) for _ in range(3)]
    for m in modules:  # non-trivial affine and running statistics, and one step already counted
        for t in (m.weight, m.bias, m.running_mean):
            t.data.uniform_(-1, 1)
        m.running_var.data.uniform_(0.5, 2)
        m.num_batches_tracked += 1
    valid = torch.tensor([[True] * 8, [True, False, True, True, False, True, True, False], [False] * 8])
    xs = [torch.randn(shape, requires_grad=True) for _ in range(3)]
    folded = torch.cat(xs, dim=1)
    stats = [torch.stack([getattr(m, k).detach().clone() for m in modules]) for k in
             ("running_mean", "running_var", "num_batches_tracked")]
    weight = torch.stack([m.weight.detach() for m in modules]).requires_grad_(True)
    bias = torch.stack([m.bias.detach() for m in modules])
    out = masked_batch_norm(folded, valid, stats[0].view(-1), stats[1].view(-1), stats[2], weight.view(-1),
                            bias.view(-1), momentum, 1e-5)
    probe = torch.randn_like(out)
    real_slots = valid.float().t().repeat_interleave(shape[1], 1).view(8, -1, *(1,) * (len(shape) - 2))
    (out * probe * real_slots).sum().backward()
    for g, (m, x) in enumerate(zip(modules, xs)):
        real = valid[g]
        if real.any():  # an idle model is not run: its statistics and counter must stay
            expected = m.train()(x[real])
            torch.testing.assert_close(out.view(8, 3, -1)[real][:, g], expected.reshape(int(real.sum()), -1))
            grad_x, grad_w = torch.autograd.grad((expected * probe.view(8, 3, -1)[real][:, g].view_as(expected)).sum(),
                                                 (x, m.weight))
            torch.testing.assert_close(xs[g].grad, grad_x)
            torch.testing.assert_close(weight.grad[g], grad_w)
        for i, k in enumerate(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(stats[i][g], m.state_dict()[k], msg=k)


def conv_bn(input_shape, num_classes):
    return nn.Sequential(nn.Conv2d(input_shape[0], 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


@pytest.mark.parametrize("path", ["folded", "vmap"])
def test_both_batched_forwards_are_nn_modules_in_training_mode(tiny_cifar, path):
    """Train-mode logits, gradients and running statistics of B = 3 stacked models equal each model's own,
    with a padded step (model 1: 5 real slots of 8; model 2: none)."""
    torch.manual_seed(0)
    models = [conv_bn(tiny_cifar.input_shape, 4) for _ in range(3)]
    params, buffers = stack_module_state(models)
    x = tiny_cifar.x_train[:24].view(3, 8, 3, 16, 16)
    forward = Folded.of(models[0], x[0, :2]) if path == "folded" else StackedForward(models[0])
    assert forward is not None
    valid = torch.tensor([[True] * 8, [True] * 5 + [False] * 3, [False] * 8])
    out = forward(params, buffers, x, valid)
    grads = torch.autograd.grad((out * valid.unsqueeze(2)).sum(), list(params.values()))
    for b, model in enumerate(models[:2]):
        expected = model.train()(x[b][valid[b]])
        torch.testing.assert_close(out[b][valid[b]], expected)
        model_grads = torch.autograd.grad(expected.sum(), list(model.parameters()))
        for g, mg in zip(grads, model_grads):
            torch.testing.assert_close(g[b], mg)
        for k, v in model.state_dict().items():
            if k in buffers:
                torch.testing.assert_close(buffers[k][b], v)
    assert torch.equal(buffers["1.running_mean"][2], models[2].state_dict()["1.running_mean"])
    assert buffers["1.num_batches_tracked"].tolist() == [1, 1, 0]
    out = forward(params, buffers, x)  # an unpadded step: F.batch_norm's in-place update, per model
    assert buffers["1.num_batches_tracked"].tolist() == [2, 2, 1]
    torch.testing.assert_close(out[2], models[2].train()(x[2]))
    torch.testing.assert_close(buffers["1.running_var"][2], models[2][1].running_var)


@pytest.mark.parametrize("path", ["folded", "vmap"])
@pytest.mark.parametrize("augment", [True, False])
def test_batched_resnet9_equals_the_one_model_trainer(tiny_cifar, float64, monkeypatch, path, augment):
    """Subsets of 24, 17 and 11 points in batches of 8: short last batches, and model 2 idle at every third
    step; parameters, running statistics, step counters and eval-mode logits within 1e-4 (in float64: RECIPE)."""
    if path == "vmap":  # the general path: what a network with a module that does not fold takes
        monkeypatch.setattr(engine.Folded, "of", classmethod(lambda cls, *a: None))
    tiny_cifar = dataclasses.replace(tiny_cifar, x_train=tiny_cifar.x_train.double(), x_test=tiny_cifar.x_test.double())
    recipe = RECIPE if augment else RECIPE.with_(augment_flip=False, augment_translate=0)
    masks, seeds = subsets([24, 17, 11]), SEEDS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        result = train_batched(MODEL, tiny_cifar, recipe, seeds, masks, group_size=2 if augment else None)  # or auto
    for b, (seed, mask) in enumerate(zip(seeds, masks)):
        model = train_model(MODEL, tiny_cifar, recipe, seed, mask)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(result.state[k][b], v, rtol=0, atol=1e-4, msg=f"model {b}, {k}")
        assert int(result.state["0.1.num_batches_tracked"][b]) == 2 * -(-int(mask.sum()) // 8)
        torch.testing.assert_close(result.logits[b], model_logits(model, tiny_cifar.all_inputs()), rtol=0, atol=1e-4,
                                   check_dtype=False)  # model_logits: float32; the stacked logits keep float64


def test_augmentation_moves_the_batched_resnet9(tiny_cifar):
    masks, seeds = subsets([17]), SEEDS[:1]
    plain = train_batched(MODEL, tiny_cifar, RECIPE.with_(augment_flip=False, augment_translate=0), seeds, masks)
    augmented = train_batched(MODEL, tiny_cifar, RECIPE, seeds, masks)
    assert not torch.allclose(plain.state["0.0.weight"], augmented.state["0.0.weight"], atol=1e-3)


def test_channels_last_changes_the_layout_not_the_result(tiny_cifar):
    masks, seeds = subsets([17, 11]), SEEDS[:2]
    plain = train_batched(MODEL, tiny_cifar, RECIPE, seeds, masks)
    last = train_batched(MODEL, tiny_cifar, RECIPE, seeds, masks, channels_last=True)
    one = train_model(MODEL, tiny_cifar, RECIPE, seeds[1], masks[1], channels_last=True)
    for k, v in one.state_dict().items():
        torch.testing.assert_close(last.state[k], plain.state[k], rtol=0, atol=1e-4)
        torch.testing.assert_close(last.state[k][1], v, rtol=0, atol=1e-4)


class PythonBranch(nn.Module):
    """Data-dependent Python control flow (`.item()`): vmap cannot run it."""

    def forward(self, x):
        return x if x.abs().max().item() < 1e6 else x.clamp(-1e6, 1e6)


class Doubled(nn.Module):
    """A module the fold does not know: the network goes through vmap."""

    def forward(self, x):
        return 2 * x


def branching(input_shape, num_classes):
    return nn.Sequential(nn.Conv2d(input_shape[0], 4, 3), nn.BatchNorm2d(4), PythonBranch(), nn.Flatten(),
                         nn.Linear(4 * 14 * 14, num_classes))


def no_running_stats(input_shape, num_classes):
    return nn.Sequential(nn.Conv2d(input_shape[0], 4, 3), nn.BatchNorm2d(4, track_running_stats=False), Doubled(),
                         nn.Flatten(), nn.Linear(4 * 14 * 14, num_classes))


@pytest.mark.parametrize("factory, names", [("branching", "module '2' (PythonBranch)"),
                                            ("no_running_stats", "module '1' (BatchNorm2d)")])
def test_a_module_vmap_cannot_run_falls_back_with_a_warning_that_names_it(tiny_cifar, factory, names):
    name = f"test_engine_batchnorm:{factory}"
    recipe = RECIPE.with_epochs(1)
    masks, seeds = subsets([17, 11]), SEEDS[:2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_batched(name, tiny_cifar, recipe, seeds, masks)
        train_batched(name, tiny_cifar, recipe, seeds, masks)
    fallback = [str(w.message) for w in caught if "one at a time" in str(w.message)]
    assert len(fallback) == 1 and names in fallback[0] and name in fallback[0], fallback
    for b, (seed, mask) in enumerate(zip(seeds, masks)):
        state = train_model(name, tiny_cifar, recipe, seed, mask).state_dict()
        assert all(torch.equal(result.state[k][b], v) for k, v in state.items())


def test_networks_the_fold_does_not_know_or_misreads_go_through_vmap(tiny_cifar):
    def doubled_bn(input_shape, num_classes):
        return nn.Sequential(nn.Conv2d(input_shape[0], 4, 3), nn.BatchNorm2d(4), Doubled(), nn.Flatten(),
                             nn.Linear(4 * 14 * 14, num_classes))
    model = doubled_bn(tiny_cifar.input_shape, 4)
    assert Folded.of(model, tiny_cifar.x_train[:2]) is None
    StackedForward(model).check(model, tiny_cifar.x_train[:2])  # raises nothing
    last_axis = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(14, 4))  # known modules, folded wrongly
    assert Folded.of(last_axis, tiny_cifar.x_train[:2]) is None and last_axis.training


def test_the_group_size_shrinks_with_the_batch_and_the_model(tiny_cifar):
    model = resnet9(tiny_cifar.input_shape, 4, width=8)
    sizes = [group_size_for(model, tiny_cifar.x_train, batch, "cpu") for batch in (1, 8, 64, 4096)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == engine.DEFAULT_GROUP_SIZE and sizes[-1] == 1
    wide = group_size_for(resnet9(tiny_cifar.input_shape, 4, width=32), tiny_cifar.x_train, 64, "cpu")
    assert wide < sizes[2]
    # the largest activation of ResNet-9 is its first conv's, width × 16 × 16 floats per image
    assert sizes[2] == engine.CPU_GROUP_TENSOR_BYTES // (4 * 8 * 16 * 16 * 64)


def test_on_a_gpu_the_group_size_is_a_share_of_total_memory_not_of_what_is_free(tiny_cifar, monkeypatch):
    """A retried task must write the same bytes, and the group decides a model's rounding on a GPU."""
    class Properties:
        total_memory = 80 << 30

    def free_memory(_device):
        raise AssertionError("the group size must not depend on the GPU's free memory")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _device: Properties)
    monkeypatch.setattr(torch.cuda, "mem_get_info", free_memory)
    model = resnet9(tiny_cifar.input_shape, 4, width=8)
    values = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: values.append(out.numel()))
             for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model.eval()(tiny_cifar.x_train[:1])
    for h in hooks:
        h.remove()
    # 3 floats per output value of every leaf module and sample, in a quarter of 80 GiB
    expected = (80 << 30) // engine.GPU_MEMORY_SHARE // (3 * 4 * sum(values) * 512)
    assert 1 < expected < engine.DEFAULT_GROUP_SIZE
    assert group_size_for(model, tiny_cifar.x_train, 512, "cuda") == expected
    assert group_size_for(model, tiny_cifar.x_train, 1, "cuda") == engine.DEFAULT_GROUP_SIZE


def test_a_model_with_batchnorm_keeps_its_eval_logits_independent_of_the_batch(tiny_cifar):
    """Eval mode uses the running statistics: the batched logits of a point do not depend on its chunk."""
    masks, seeds = subsets([24, 11]), SEEDS[:2]
    result = train_batched(MODEL, tiny_cifar, RECIPE.with_epochs(1), seeds, masks)
    folded = Folded(small_resnet9(tiny_cifar.input_shape, 4))
    x = tiny_cifar.all_inputs()
    torch.testing.assert_close(folded.logits(result.state, x, model_points=2), result.logits)
