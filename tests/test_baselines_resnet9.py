"""Every baseline on the ResNet-9 path (issue 14 point 5): a tiny CIFAR-format fixture (24 images of 3 × 16 × 16,
4 classes), one trained ResNet-9 with BatchNorm, each stacked method at small settings (N = 1; a stack of
several BatchNorm models steps each as alone), then `amnesiac` from a recorded ResNet-9 and OM's matching (DMM's, with
other targets). `pru` is for linear models only; `sisa`'s ResNet-9 test is in tests/test_baselines_sisa.py.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch

from attribution.datasets import make_dataset
from attribution.checkpoint import model_meta, save_model
from attribution.engine import train_model
from attribution.evaluation import model_logits
from attribution.models import build_model
from attribution.recipes import RECIPES
from matching.baselines.stack import ModelStack, StackedTask
from attribution.update_record import UpdateRecorder
from matching.methods import METHOD_CONFIGS, METHODS, STACKED_METHODS, UnlearnTask

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:model 'resnet9' has BatchNorm")]

RECIPE = RECIPES["cifar10-resnet9"].with_(batch_size=8).with_epochs(1)
FORGET = np.array([1, 5, 7])
SMALL = {"epochs": 1, "max_epochs": 1, "fisher_samples": 8}  # the settings a method has, cut to keep the test short
SSD_ALPHA = 1.0  # at the default α = 10 no weight of this tiny random task is F-specific enough to dampen


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(0)
    images = make_dataset("tiny-cifar", rng.normal(size=(24, 3, 16, 16)), rng.integers(0, 4, 24),
                          rng.normal(size=(8, 3, 16, 16)), rng.integers(0, 4, 8), num_classes=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = train_model("resnet9", images, RECIPE, 0)
    return images, model


def small_config(name: str):
    config = METHOD_CONFIGS[name]()
    names = {f.name for f in dataclasses.fields(config)}
    small = {**SMALL, "alpha": SSD_ALPHA} if name == "ssd" else SMALL
    return dataclasses.replace(config, **{k: v for k, v in small.items() if k in names})


@pytest.mark.parametrize("name", sorted(set(STACKED_METHODS) - {"pru"}))
def test_every_baseline_unlearns_a_resnet9_with_batchnorm(trained, name):
    images, model = trained
    stack = ModelStack.of([model])
    before = {k: v.clone() for k, v in stack.params.items()}
    result = STACKED_METHODS[name](StackedTask(stack, images, FORGET, small_config(name), (0,), "resnet9", RECIPE))
    logits = result.stack.logits(images.all_inputs())
    assert logits.shape == (1, images.n_points, 4) and torch.isfinite(logits).all()
    assert any(not torch.equal(before[k], v) for k, v in result.stack.params.items()), f"{name} moved no weight"
    assert all(torch.equal(before[k], v) for k, v in stack.params.items())  # the input stack is not edited


def test_a_stack_of_several_batchnorm_models_steps_each_as_alone(trained):
    """Per-model batch and running statistics under vmap: two ResNet-9s fine-tuned in one stack equal each
    fine-tuned alone (N = 1), running statistics included."""
    images, model = trained
    other = build_model("resnet9", images.input_shape, 4, 1).eval()
    config = small_config("finetune")
    both = STACKED_METHODS["finetune"](StackedTask(ModelStack.of([model, other]), images, FORGET, config, (0, 1),
                                                   "resnet9", RECIPE)).stack.state()
    for n, one in enumerate((model, other)):
        alone = STACKED_METHODS["finetune"](StackedTask(ModelStack.of([one]), images, FORGET, config, (n,), "resnet9",
                                                        RECIPE)).stack.state()
        for k, v in alone.items():
            torch.testing.assert_close(both[k][n], v[0], rtol=0, atol=1e-5, msg=k)
    assert not torch.equal(both["0.1.running_mean"][0], model.state_dict()["0.1.running_mean"])


def test_amnesiac_subtracts_a_recorded_resnet9s_updates(trained, tmp_path):
    """The record holds the parameters' updates only (BatchNorm's running statistics are buffers): the bare
    subtraction changes exactly the parameters, and leaves every buffer as trained."""
    images, _ = trained
    path = tmp_path / "r9.safetensors"
    recorder = UpdateRecorder(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = train_model("resnet9", images, RECIPE, 0, recorder=recorder)
    save_model(path, model.state_dict(), model_meta(images, "resnet9", RECIPE, 0, update_record=recorder.finish()))
    task = UnlearnTask(model=model, data=images, forget_ids=FORGET, store=None, original_logits=None,
                       config=METHOD_CONFIGS["amnesiac"](epochs=0), model_path=str(path))
    out = METHODS["amnesiac"](task).model
    assert all(not torch.equal(p, model.get_parameter(n)) for n, p in out.named_parameters() if "weight" in n)
    assert all(torch.equal(b, model.get_buffer(n)) for n, b in out.named_buffers())
    assert torch.isfinite(model_logits(out, images.all_inputs())).all()


def test_oms_matching_fine_tunes_a_resnet9_towards_its_targets(trained):
    """OM (and DMM: the same fine-tuning, other targets) on a BatchNorm model: the matching loss falls.
    At the paper's CIFAR-10 lr 5e-4: the digits default 5e-3 moves a ResNet-9's weights too far per Adam step."""
    images, model = trained
    model = copy.deepcopy(model)  # the matching fine-tunes in place
    targets = model_logits(model, images.all_inputs()).numpy() + np.eye(4, dtype=np.float32)[0]  # shift logit 0
    task = UnlearnTask(model=model, data=images, forget_ids=FORGET, store=None, original_logits=None,
                       config=METHOD_CONFIGS["om"](lr=5e-4, min_steps=20, max_steps=40), oracle_mean_logits=targets)
    stats = METHODS["om"](task).stats
    assert stats["steps"] >= 20 and stats["loss_end"] < 0.5 * stats["loss_start"]
