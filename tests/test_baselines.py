"""The baseline unlearners (matching/baselines): the property that defines each method, on digits,
and that the stacked run over N models equals N one-model runs."""
from __future__ import annotations

import dataclasses
from dataclasses import replace

import numpy as np
import pytest
import torch

import attribution.engine as engine
from attribution.datasets import load_dataset
from attribution.evaluation import model_logits
from attribution.recipes import RECIPES
from cluster.eval_methods import apply_method, load_model_from_state
from matching.baselines.masks import blocks, saliency_mask
from matching.baselines.random_label import random_labels
from matching.baselines.stack import ModelStack, StackedTask
from matching.errors import MatchingError
from matching.methods import METHOD_CONFIGS, METHODS, STACKED_METHODS, UnlearnTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 3
FORGET = np.arange(0, 1400, 28)  # 50 training ids
RECIPE = RECIPES["digits-mlp"].with_epochs(4)
FAST = {"retrain": {"epochs": 1}, "eu-k": {"epochs": 1}, "scrub": {"epochs": 2, "max_epochs": 1},
        "ssd": {}, "iu": {"fisher_samples": 200}}


@pytest.fixture(scope="module")
def world():
    data = load_dataset("digits")
    originals = engine.train_batched("mlp", data, RECIPE, list(range(N)), np.ones((N, data.n_train), bool))
    return data, originals


def original(world, n: int = 0) -> torch.nn.Module:
    data, originals = world
    return load_model_from_state("mlp", data, originals.state_dict(n))


def task_of(world, name: str, n: int = 0, **params) -> UnlearnTask:
    data, _ = world
    model = original(world, n)
    config = METHOD_CONFIGS[name](**{**FAST.get(name, {"epochs": 1}), **params})
    return UnlearnTask(model=model, data=data, forget_ids=FORGET, store=None,
                       original_logits=model_logits(model, data.all_inputs()).numpy(), config=config,
                       model_name="mlp", recipe=RECIPE)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def ce(model, data, ids) -> float:
    logits = model_logits(model, data.x_train[ids])
    return torch.nn.functional.cross_entropy(logits, data.y_train[ids]).item()


def test_every_baseline_is_registered_with_a_documented_frozen_config():
    for name in STACKED_METHODS:
        cls = METHOD_CONFIGS[name]
        assert name in METHODS and dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{name}.{f.name} has no one-line doc"
        config = cls()
        assert config.to_dict() == dataclasses.asdict(config) and isinstance(config.seed, int)
    assert {"retrain", "finetune", "ga", "neggrad+", "random-label", "salun", "l1-sparse", "scrub", "eu-k",
            "cf-k"} <= set(STACKED_METHODS) and {"dmm", "om"} <= set(METHODS)


@pytest.mark.parametrize("name, params, needle", [
    ("finetune", {"lr": -1.0}, "lr -1.0 must be > 0"),
    ("salun", {"mask_fraction": 0.0}, "mask_fraction 0.0 must lie in (0, 1]"),
    ("scrub", {"max_epochs": 9}, "max_epochs 9 must lie in 0..epochs=5"),
    ("neggrad+", {"alpha": 2.0}, "alpha 2.0 must lie in [0, 1]"),
])
def test_bad_hyperparameters_are_one_line_errors(name, params, needle):
    with pytest.raises(MatchingError, match=None) as e:
        METHOD_CONFIGS[name](**params)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_retrain_never_sees_a_forgotten_id_and_starts_from_a_new_seed(world, monkeypatch):
    data, _ = world
    seen = []
    real = engine.epoch_permutations

    def recording(indices, epochs, order_seed):
        seen.append((indices.clone(), epochs, order_seed))
        return real(indices, epochs, order_seed)

    monkeypatch.setattr(engine, "epoch_permutations", recording)
    task = task_of(world, "retrain")
    theta0 = state(task.model)
    out = METHODS["retrain"](task)
    retain = np.setdiff1d(np.arange(data.n_train), FORGET)
    assert seen and all(np.array_equal(np.sort(ids.numpy()), retain) for ids, _, _ in seen)
    assert [(epochs, seed == engine.derive_seeds(0)[1]) for _, epochs, seed in seen] == [(1, False)]  # new seed
    assert all(not torch.equal(out.model.state_dict()[k], theta0[k]) for k in theta0)
    assert out.stats["sample_grads"] == len(retain)
    with pytest.raises(MatchingError, match="retrain needs the model's name and training recipe"):
        METHODS["retrain"](replace(task, model_name=None, recipe=None))


def test_gradient_ascent_raises_the_loss_on_forget(world):
    data, _ = world
    task = task_of(world, "ga", epochs=5, lr=0.05)
    before = ce(task.model, data, FORGET)
    after = ce(METHODS["ga"](task).model, data, FORGET)
    assert after > before + 0.05, (before, after)


def test_neggrad_plus_ascends_on_forget_and_descends_on_retain(world):
    data, _ = world
    retain = np.setdiff1d(np.arange(data.n_train), FORGET)
    plus = METHODS["neggrad+"](task_of(world, "neggrad+", alpha=0.5)).model
    fine = METHODS["finetune"](task_of(world, "finetune")).model
    assert ce(plus, data, FORGET) > ce(fine, data, FORGET) + 0.05
    assert ce(plus, data, retain) < 0.5


def test_random_labels_are_wrong_on_forget_only_and_drawn_per_model(world):
    data, _ = world
    task = StackedTask(ModelStack.of([original(world)] * 2), data, FORGET, METHOD_CONFIGS["random-label"](), (0, 1))
    labels = random_labels(task)
    y = data.y_train
    retain = np.setdiff1d(np.arange(data.n_train), FORGET)
    assert (labels[:, FORGET] != y[FORGET]).all() and torch.equal(labels[:, retain], y[retain].repeat(2, 1))
    assert not torch.equal(labels[0], labels[1])


def test_scrub_steps_the_student_only(world):
    task = task_of(world, "scrub")
    teacher = state(task.model)
    out = METHODS["scrub"](task).model
    assert all(torch.equal(task.model.state_dict()[k], v) for k, v in teacher.items())  # the frozen teacher
    assert all(not torch.equal(out.state_dict()[k], v) for k, v in teacher.items())     # the student moved


def test_salun_moves_no_weight_outside_its_saliency_mask(world):
    data, _ = world
    task = task_of(world, "salun", weight_decay=5e-2, momentum=0.9, mask_fraction=0.3)
    theta0 = state(task.model)
    f = torch.as_tensor(FORGET)
    mask = saliency_mask(ModelStack.of([task.model]), data.x_train[f], data.y_train[f], 0.3)
    out = METHODS["salun"](task).model.state_dict()
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == round(0.3 * sum(v.numel() for v in theta0.values()))
    for k, m in mask.items():
        assert torch.equal(out[k][~m[0]], theta0[k][~m[0]]), k        # frozen: bit-identical
        assert (out[k][m[0]] != theta0[k][m[0]]).float().mean() > 0.9  # salient: moved


@pytest.mark.parametrize("name", ["eu-k", "cf-k"])
def test_last_k_blocks_methods_change_nothing_else(world, name):
    task = task_of(world, name, weight_decay=5e-2, momentum=0.9)
    theta0 = state(task.model)
    out = METHODS[name](task).model.state_dict()
    first, last = blocks(ModelStack.of([task.model]))
    assert first == ["1.weight", "1.bias"] and last == ["3.weight", "3.bias"]
    assert all(torch.equal(out[k], theta0[k]) for k in first)
    assert all((out[k] != theta0[k]).all() for k in last)
    with pytest.raises(MatchingError, match="k = 3 but the model has 2 blocks"):
        METHODS[name](task_of(world, name, k=3))


def test_l1_sparse_is_finetuning_plus_a_shrinking_l1_penalty(world):
    def l1(model):
        return sum(p.abs().sum().item() for p in model.parameters())
    sparse = METHODS["l1-sparse"](task_of(world, "l1-sparse", gamma=1e-2, epochs=2)).model
    plain = METHODS["l1-sparse"](task_of(world, "l1-sparse", gamma=0.0, epochs=2)).model
    fine = METHODS["finetune"](task_of(world, "finetune", epochs=2)).model
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fine.state_dict().values()))
    assert l1(sparse) < 0.95 * l1(plain)


@pytest.mark.parametrize("name", sorted(STACKED_METHODS))
def test_stacked_run_equals_one_model_runs(world, name):
    """apply_method's single stacked pass over N originals = a brute-force loop of one-model runs (seed + n)."""
    data, originals = world
    params = FAST.get(name, {"epochs": 1})
    if name == "retrain":  # the evaluation's floor is a population; the stacked method is checked directly
        config = METHOD_CONFIGS[name](**params)
        stack = ModelStack.of([original(world, n) for n in range(N)])
        result = STACKED_METHODS[name](StackedTask(stack, data, FORGET, config, tuple(range(N)), "mlp", RECIPE))
        logits = result.stack.logits(data.all_inputs()).numpy()
    else:
        logits, states, _, stats = apply_method(name, params, "mlp", data, originals.state,
                                                originals.logits.numpy(), FORGET)
        assert states["1.weight"].shape[0] == N and stats[0]["sample_grads"] > 0
    for n in range(N):
        one = METHODS[name](replace(task_of(world, name, n, **params), config=METHOD_CONFIGS[name](
            **{**params, "seed": n})))
        np.testing.assert_allclose(model_logits(one.model, data.all_inputs()).numpy(), logits[n], atol=1e-4)
