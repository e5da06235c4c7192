"""`dmm evaluate` with the training-time methods: `amnesiac` unlearns originals trained with update records,
`sisa` SISA ensembles, both trained with the plain originals' seeds, cached like every stage, and judged
against the same oracles as every other method."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from fixtures_store import MODEL, digits_store

from attribution.checkpoint import load_model
from attribution.evaluation import model_logits
from attribution.recipes import Recipe
from attribution.sisa import SisaEnsemble
from attribution.update_record import UpdateRecord, record_dir
from cluster.dag import stage_paths
from cluster.eval_spec import spec_from_dict
from cluster.evaluate import experiment_stages, run_evaluation
from matching.baselines.config import BaselineConfigError
from matching.methods import METHOD_CONFIGS, METHODS, UnlearnTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FORGET_SET = "random:10:0"
N = 4  # U-LiRA needs >= 4 models per population


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return digits_store(tmp_path_factory.getbasetemp() / "digits-store")  # test_evaluate's store


def raw_spec(fixture, **methods):
    return {"dataset": fixture.data.name, "models": N, "attribution": {"store": fixture.url},
            "forget_sets": [FORGET_SET], "methods": {"amnesiac": {}, "sisa": {"shards": 2, "slices": 2}, **methods},
            "metrics": {"relearn_models": 1, "mia_models": N, "relearn_max_steps": 20}}


@pytest.fixture(scope="module")
def evaluated(fixture, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    spec = spec_from_dict(raw_spec(fixture))
    result = run_evaluation(spec, out, progress=False)
    paths = stage_paths(experiment_stages(spec, out)[0], out / "cache")
    forget = np.load(paths[f"forget[{FORGET_SET}]"] / "ids.npy")
    return out, result, paths, forget


def stage(paths: dict, prefix: str):
    (name,) = [n for n in paths if n.startswith(prefix)]
    return paths[name]


def by_hand(method: str, path, data, forget, n: int):
    """Method `method` run directly on original n's file, as `dmm unlearn --model` would (seed + n, as the DAG)."""
    model, meta = load_model(path, data)
    config = replace(METHOD_CONFIGS[method](), seed=n)
    task = UnlearnTask(model=model, data=data, forget_ids=forget, store=None, original_logits=None, config=config,
                       model_name=MODEL, recipe=Recipe.from_dict(meta["recipe"]), model_path=str(path))
    return model, METHODS[method](task)


def test_both_methods_report_klom_and_their_own_costs(evaluated, fixture):
    _, result, _, forget = evaluated
    rows = {r["method"]: r for r in result["rows"]}
    assert sorted(rows) == ["amnesiac", "retrain", "sisa"]
    for method in ("amnesiac", "sisa"):
        assert all(math.isfinite(rows[method][f"klom95_{g}"]) for g in ("forget", "retain", "heldout"))
        assert rows[method]["seconds"] > 0 and rows[method]["cost_vs_retrain"] > 0
    assert rows["amnesiac"]["sample_grads"] == fixture.data.n_train - len(forget)  # its repair: one epoch on S∖F
    assert rows["amnesiac"]["weight_distance"] > 0  # from its own (recorded) originals
    assert rows["sisa"]["weight_distance"] is None and rows["sisa"]["relearn_steps"] is None  # no one θ


def test_amnesiac_unlearns_recorded_originals_of_the_same_seeds_as_by_hand(evaluated, fixture):
    _, _, paths, forget = evaluated
    data, originals = fixture.data, stage(paths, "originals[amnesiac")
    steps = fixture.recipe.epochs * math.ceil(data.n_train / fixture.recipe.batch_size)
    # trained one at a time (train_model) with the seeds of the stacked plain originals: equal up to ~1e-6
    np.testing.assert_allclose(np.load(originals / "logits.npy"), np.load(paths["originals"] / "logits.npy"),
                               atol=1e-3)
    population = np.load(paths[f"method[{FORGET_SET}][amnesiac]"] / "logits.npy")
    for n in range(N):
        path = originals / f"model-{n:05d}.safetensors"
        record = UpdateRecord.of_model(path)
        assert record_dir(path).is_dir() and record.steps == steps and record.manifest["keep"] == 1.0
        model, out = by_hand("amnesiac", path, data, forget, n)
        record.check_model(model, path)  # the record is of this very model
        assert out.stats["batches_removed"] > 0
        np.testing.assert_allclose(population[n], model_logits(out.model, data.all_inputs()).numpy(), atol=1e-5)
        assert np.abs(population[n] - np.load(originals / "logits.npy")[n]).max() > 1e-2  # it did unlearn


def test_sisa_retrains_its_ensembles_without_ever_seeing_F(evaluated, fixture, training_ids):
    _, result, paths, forget = evaluated
    data, originals = fixture.data, stage(paths, "originals[sisa")
    seen = training_ids
    population = np.load(paths[f"method[{FORGET_SET}][sisa]"] / "logits.npy")
    grads = []
    for n in range(N):
        model, out = by_hand("sisa", originals / f"model-{n:05d}.safetensors", data, forget, n)
        assert isinstance(model, SisaEnsemble) and (model.shards, model.slices) == (2, 2) and int(model.seed) == n
        np.testing.assert_allclose(population[n], model_logits(out.model, data.all_inputs()).numpy(), atol=1e-5)
        grads.append(out.stats["sample_grads"])
    assert seen and not any(ids & set(forget.tolist()) for ids in seen)
    (row,) = [r for r in result["rows"] if r["method"] == "sisa"]
    assert row["sample_grads"] == np.mean(grads) > 0


def test_a_rerun_is_cached_and_a_variant_shares_the_recorded_originals(evaluated, fixture):
    out, first, _, _ = evaluated
    again = run_evaluation(spec_from_dict(raw_spec(fixture)), out, progress=False)
    assert again["cached"] == again["stages"] == first["stages"]
    grown = run_evaluation(spec_from_dict(raw_spec(fixture, **{"amnesiac@bare": {"epochs": 0}})), out,
                           progress=False)
    assert grown["stages"] - grown["cached"] == 2  # its method and metrics stages; the originals are shared
    (row,) = [r for r in grown["rows"] if r["method"] == "amnesiac@bare"]
    assert row["sample_grads"] == 0


@pytest.mark.parametrize("params, match", [({"shards": 0}, "shards 0 and slices 4 must be >= 1"),
                                           ({"keep": 0.0}, r"keep 0.0 must lie in \(0, 1\]")])
def test_bad_training_time_hyperparameters_are_one_line_errors(fixture, params, match):
    method = "sisa" if "shards" in params else "amnesiac"
    with pytest.raises(BaselineConfigError, match=match):
        spec_from_dict({**raw_spec(fixture), "methods": {method: params}})
