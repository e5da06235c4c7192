"""The stacked baselines off the CPU: block budgets that scale on a GPU (`per_sample.block_floats`), and on a
CUDA GPU (skipped without one) every stackable method on a stack held there, against the same task on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.datasets import load_dataset
from attribution.engine import train_batched
from attribution.models import build_model
from attribution.recipes import default_recipe
from matching.baselines.influence import GRAM_FLOATS, model_groups
from matching.baselines.per_sample import ACCELERATOR_SCALE, block_floats
from matching.baselines.stack import ModelStack, StackedTask
from matching.methods import METHOD_CONFIGS, STACKED_METHODS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_block_budgets_are_the_cpus_on_a_cpu_and_scaled_on_a_gpu():
    assert block_floats(1000, "cpu") == 1000
    assert block_floats(1000, torch.device("cuda", 1)) == 1000 * ACCELERATOR_SCALE
    m = 1000  # IU's default Fisher points: one model's Gram matrix fills the CPU's budget
    assert GRAM_FLOATS // (m * m) == 1
    assert model_groups(64, m, "cpu") == [slice(n, n + 1) for n in range(64)]
    assert model_groups(64, m, "cuda") == [slice(0, 67)]  # 64 · 2^20 floats hold 67 Gram matrices of 10^6
    assert model_groups(140, m, "cuda") == [slice(0, 67), slice(67, 134), slice(134, 201)]


@pytest.fixture(scope="module")
def originals():
    data, recipe = load_dataset("digits"), default_recipe("digits", "mlp")
    trained = train_batched("mlp", data, recipe, [0, 1], np.ones((2, data.n_train), bool))
    base = build_model("mlp", data.input_shape, data.num_classes, 0).to("meta")
    return data, recipe, ModelStack(base, dict(trained.state), {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(STACKED_METHODS))
def test_every_stacked_method_runs_on_a_gpu_stack_as_on_the_cpu(originals, name):
    """A stack held on the GPU is unlearned there (every index, mask and re-initialisation follows it) and
    gives the CPU's models up to float rounding, as every random draw is made on the CPU from the seeds. The
    tolerance is 10× the largest rounding effect seen on an H200 (a ReLU that flips in one model of 64 took
    a 20-epoch retrain 4.4e-3 away); a wrong draw or mask moves logits by O(1)."""
    data, recipe, stack = originals
    forget = np.arange(0, data.n_train, 29)
    on_gpu = ModelStack(stack.base, {k: v.cuda() for k, v in stack.params.items()}, {})
    results = [STACKED_METHODS[name](StackedTask(s, data, forget, METHOD_CONFIGS[name](), (0, 1), "mlp", recipe))
               for s in (stack, on_gpu)]
    assert all(v.is_cuda for v in results[1].stack.params.values())
    x = data.all_inputs()
    torch.testing.assert_close(results[1].stack.logits(x).cpu(), results[0].stack.logits(x), rtol=0, atol=5e-2)
    assert results[1].stats == results[0].stats
