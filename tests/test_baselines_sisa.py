"""SISA (attribution/sisa.py, matching/baselines/sisa.py): the plan, exact unlearning that retrains only the
affected shards from the right slice, the ensemble's vote and mean logits, and `dmm train --sisa` →
`dmm unlearn --method sisa` → `dmm predict`."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

import attribution.engine as engine
from attribution.checkpoint import load_model, model_meta, save_model
from attribution.datasets import load_dataset, make_dataset
from attribution.evaluation import model_logits
from attribution.recipes import RECIPES
from attribution.sisa import SisaEnsemble, SisaError, sisa_plan, stage_epochs, stage_seed, train_sisa
from attribution.store import AttributionStore, StoreSpec
from cluster.cli import main
from matching.errors import MatchingError
from matching.ledger import read_ledger
from matching.methods import METHOD_CONFIGS, METHODS, UnlearnTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = RECIPES["digits-mlp"].with_epochs(4)  # e' = round(2·4/(R+1)) = 2 epochs per stage for R = 3
S, R = 3, 3


@pytest.fixture(scope="module")
def world():
    data = load_dataset("digits")
    ensemble, stats = train_sisa("mlp", data, RECIPE, 0, S, R)
    return data, ensemble, stats


def ids_in(ensemble: SisaEnsemble, shard: int, r: int, count: int) -> np.ndarray:
    """`count` training ids of slice r of shard s (0-based)."""
    return np.flatnonzero(ensemble.slot.numpy() == shard * ensemble.slices + r)[:count]


def stage_states(ensemble: SisaEnsemble) -> list[list[dict[str, torch.Tensor]]]:
    return [[{k: v.clone() for k, v in m.state_dict().items()} for m in shard] for shard in ensemble.stages]


def unlearn(ensemble: SisaEnsemble, data, forget: np.ndarray):
    task = UnlearnTask(model=ensemble, data=data, forget_ids=np.sort(forget), store=None, original_logits=None,
                       config=METHOD_CONFIGS["sisa"](), model_name="mlp", recipe=RECIPE)
    return METHODS["sisa"](task)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_plan_cuts_S_into_disjoint_near_equal_slices_drawn_from_the_seed():
    slot = sisa_plan(1437, 3, 4, seed=5).numpy()
    sizes = np.bincount(slot, minlength=12)
    assert sizes.sum() == 1437 and sizes.max() - sizes.min() <= 1  # every id in exactly one slice
    assert np.array_equal(slot, sisa_plan(1437, 3, 4, seed=5).numpy())
    assert not np.array_equal(slot, sisa_plan(1437, 3, 4, seed=6).numpy())
    assert stage_epochs(20, 4) == 8 and stage_epochs(1, 9) == 1  # e' = 2e/(R+1), at least 1
    with pytest.raises(SisaError, match="3 shards × 4 slices leave a slice of the 10 training points empty"):
        sisa_plan(10, 3, 4, seed=0)


def test_sisa_retrains_exactly_the_affected_shards_from_the_right_slice(world):
    data, ensemble, _ = world
    before = stage_states(ensemble)
    forget = np.concatenate([ids_in(ensemble, 1, 1, 4), ids_in(ensemble, 1, 2, 2), ids_in(ensemble, 2, 2, 3)])
    out = unlearn(ensemble, data, forget)
    after = stage_states(out.model)
    changed = [[not same(after[s][r], before[s][r]) for r in range(R)] for s in range(S)]
    assert changed == [[False, False, False], [False, True, True], [False, False, True]]
    assert same(stage_states(ensemble)[1][2], before[1][2])  # the input ensemble is not edited
    assert np.array_equal(np.flatnonzero(out.model.forgotten.numpy()), np.sort(forget))
    slot, kept = ensemble.slot.numpy(), np.ones(data.n_train, bool)
    kept[forget] = False
    stage_sizes = [(kept & (slot // R == s) & (slot % R <= r)).sum() for s, r in ((1, 1), (1, 2), (2, 2))]
    assert {k: out.stats[k] for k in ("shards_retrained", "slices_retrained", "sample_grads")} == \
        {"shards_retrained": 2, "slices_retrained": 3, "sample_grads": 2 * sum(stage_sizes)}
    again = unlearn(out.model, data, forget)  # nothing new to forget: nothing retrained
    assert again.stats["shards_retrained"] == 0 and all(
        same(a, b) for sa, sb in zip(stage_states(again.model), after) for a, b in zip(sa, sb))


def test_retrained_shards_never_see_a_forgotten_id(world, training_ids):
    data, ensemble, _ = world
    seen = training_ids
    forget = np.concatenate([ids_in(ensemble, 0, 0, 5), ids_in(ensemble, 2, 1, 5)])
    unlearn(ensemble, data, forget)
    slot = ensemble.slot.numpy()
    expected = [set(np.flatnonzero((slot // R == s) & (slot % R <= r))) - set(forget.tolist())
                for s, r in ((0, 0), (0, 1), (2, 1), (0, 2), (2, 2))]  # stage by stage, shards in order
    assert seen == expected and not any(ids & set(forget.tolist()) for ids in seen)


def test_one_shard_unlearned_equals_that_shard_retrained_without_F(world):
    data, _, _ = world
    one, _ = train_sisa("mlp", data, RECIPE, 3, 1, R)
    forget = np.concatenate([ids_in(one, 0, 1, 6), ids_in(one, 0, 2, 6)])
    out = unlearn(one, data, forget).model
    scratch, _ = train_sisa("mlp", data, RECIPE, 3, 1, R, excluded=forget)
    for r in range(R):  # same seeds, same stage data, the same computation: bitwise
        assert same(out.stages[0][r].state_dict(), scratch.stages[0][r].state_dict())
    # and each stage replayed by hand with the one-model trainer: slices 1..r without F, e' epochs from the
    # checkpoint of stage r−1 (stage 1: the seed's initialisation), the seed of (shard 0, stage r)
    slot, stage_recipe = one.slot.numpy(), RECIPE.with_epochs(stage_epochs(RECIPE.epochs, R))
    for r in range(R):
        mask = slot <= r
        mask[forget] = False
        start = out.stages[0][r - 1].state_dict() if r else None
        replay = engine.train_model("mlp", data, stage_recipe, stage_seed(3, 0, r), mask, init=start).state_dict()
        for k, v in out.stages[0][r].state_dict().items():
            torch.testing.assert_close(v, replay[k], rtol=0, atol=1e-4)


def test_prediction_is_the_majority_vote_or_the_mean_logits():
    def ensemble(biases):
        e = SisaEnsemble(torch.nn.Linear(2, 3), len(biases), 1, n_train=4)
        for shard, b in zip(e.stages, biases):
            shard[0].weight.zero_()
            shard[0].bias.copy_(torch.tensor(b))
        return e

    x = torch.zeros(1, 2)
    three = ensemble([[0.0, 5.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # votes: class 0 twice, class 1 once
    torch.testing.assert_close(three(x), torch.tensor([[2 / 3, 5 / 3, 0.0]]))
    assert three.predict(x).tolist() == [0] and three.predict(x, rule="mean").tolist() == [1]
    tie = ensemble([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # one vote each for classes 2 and 1: the lower wins
    assert tie.predict(x).tolist() == [1]
    with pytest.raises(SisaError, match="unknown prediction rule 'median'; use one of vote, mean"):
        tie.predict(x, rule="median")


@pytest.fixture(scope="module")
def files(tmp_path_factory, world):
    """A SISA model (`dmm train --sisa 2,3`), a plain model, an id file and an (unfitted) store."""
    data = world[0]
    base = tmp_path_factory.mktemp("sisa")
    sisa_file, plain = base / "sisa.safetensors", base / "plain.safetensors"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "--dataset", "digits", "--epochs", "4", "--seed", "1", "--sisa", "2,3",
                     "--out", str(sisa_file)]) == 0
    trained = engine.train_batched("mlp", data, RECIPE, [0], np.ones((1, data.n_train), bool))
    save_model(plain, trained.state_dict(0), model_meta(data, "mlp", RECIPE, 0))
    ids = base / "forget.txt"
    ids.write_text(" ".join(map(str, range(0, 40, 4))))
    spec = StoreSpec(dataset=data.name, fingerprint=data.fingerprint, model="mlp", recipe=RECIPE.to_dict(), alpha=0.5,
                     seed=0, block_size=100, n_train=data.n_train, n_points=data.n_points, num_classes=10)
    return dict(data=data, sisa=sisa_file, plain=plain, ids=ids, spec=spec, printed=printed.getvalue())


def test_dmm_train_sisa_then_unlearn_then_predict(files, tmp_path):
    data = files["data"]
    model, meta = load_model(files["sisa"], data)
    assert isinstance(model, SisaEnsemble) and (model.shards, model.slices) == (2, 3)
    assert meta["sisa"]["stage_epochs"] == 2 and meta["recipe"] == RECIPE.to_dict()
    assert files["printed"].startswith("SISA 2x3: held-out accuracy ") and " by vote (" in files["printed"]
    out = tmp_path / "unlearned.safetensors"
    assert main(["unlearn", "--dataset", "digits", "--method", "sisa", "--model", str(files["sisa"]),
                 "--forget", str(files["ids"]), "--out", str(out)]) == 0
    unlearned, out_meta = load_model(out, data)
    forget = np.arange(0, 40, 4)
    assert np.array_equal(np.flatnonzero(unlearned.forgotten.numpy()), forget) and "sisa" in out_meta
    held = set((model.slot.numpy()[forget] // 3).tolist())
    for s in range(2):  # a shard that held no id of F is bit-identical
        assert same(unlearned.stages[s][-1].state_dict(), model.stages[s][-1].state_dict()) == (s not in held)
    logits = tmp_path / "logits.npy"
    assert main(["predict", "--model", str(out), "--out", str(logits)]) == 0
    np.testing.assert_allclose(np.load(logits), model_logits(unlearned, data.all_inputs()).numpy())


def test_sisa_requests_on_a_store_chain_and_retrain_only_for_new_ids(files, tmp_path, capsys):
    store = AttributionStore.open_or_create(str(tmp_path / "store.zarr"), files["spec"], 100).url
    first, second, ids2 = tmp_path / "r1.safetensors", tmp_path / "r2.safetensors", tmp_path / "more.txt"
    assert main(["unlearn", "--store", store, "--method", "sisa", "--model", str(files["sisa"]),
                 "--forget", str(files["ids"]), "--out", str(first)]) == 0
    model = load_model(files["sisa"], files["data"])[0]
    new = [i for i in ids_in(model, 1, 2, 30) if i >= 40][:1]  # one more id, in the last slice of shard 1
    ids2.write_text(" ".join(map(str, [0, 4, *new])))
    assert main(["unlearn", "--store", store, "--method", "sisa", "--model", str(first),
                 "--forget", str(ids2), "--out", str(second)]) == 0
    assert "request 2: sisa forgot 1 new ids (2 already forgotten), 11 in all" in capsys.readouterr().out
    one, two = read_ledger(AttributionStore.open(store))
    assert one.method == "sisa" and one.stats["shards_retrained"] >= 1
    assert (two.stats["shards_retrained"], two.stats["slices_retrained"]) == (1, 1)
    assert json.loads((tmp_path / "r2.safetensors.json").read_text())["unlearned"]["request"] == 2


def test_a_model_trained_without_sisa_is_refused_in_one_line_and_nothing_is_written(files, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert main(["unlearn", "--dataset", "digits", "--method", "sisa", "--model", str(files["plain"]),
                 "--forget", str(files["ids"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sisa needs a model trained with `dmm train --sisa SHARDS,SLICES`" in err[0]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MatchingError, match="sisa needs a model trained with"):
        unlearn(load_model(files["plain"], files["data"])[0], files["data"], np.array([1]))


@pytest.mark.parametrize("shape, needle", [("0,3", "'0,3' is not SHARDS,SLICES"), ("2", "'2' is not SHARDS,SLICES"),
                                           ("500,3", "500 shards × 3 slices leave a slice of the 1437 training")])
def test_bad_sisa_shapes_are_one_line_errors_that_write_nothing(tmp_path, capsys, shape, needle):
    out = tmp_path / "m.safetensors"
    try:
        code = main(["train", "--dataset", "digits", "--sisa", shape, "--out", str(out)])
    except SystemExit as e:  # argparse's own one-line error
        code = e.code
    assert code == 2 and needle in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_sisa_on_the_resnet9_path_with_batchnorm_buffers():
    """BatchNorm models train their shards batched (`train_batched`), from the checkpoints; a shard retrained
    alone equals the one trained from scratch beside another shard to float rounding (grouped convolutions)."""
    rng = np.random.default_rng(0)
    images = make_dataset("tiny-cifar", rng.normal(size=(24, 3, 16, 16)), rng.integers(0, 4, 24),
                          rng.normal(size=(8, 3, 16, 16)), rng.integers(0, 4, 8), num_classes=4)
    recipe = RECIPES["cifar10-resnet9"].with_(batch_size=8).with_epochs(2)  # e' = 1 epoch per stage, R = 2
    ensemble, _ = train_sisa("resnet9", images, recipe, 0, 2, 2)
    forget = ids_in(ensemble, 0, 1, 2)
    task = UnlearnTask(model=ensemble, data=images, forget_ids=np.sort(forget), store=None, original_logits=None,
                       config=METHOD_CONFIGS["sisa"](), model_name="resnet9", recipe=recipe)
    out = METHODS["sisa"](task).model
    before, after = stage_states(ensemble), stage_states(out)
    assert [[not same(after[s][r], before[s][r]) for r in range(2)] for s in range(2)] == [[False, True], [False, False]]
    scratch, _ = train_sisa("resnet9", images, recipe, 0, 2, 2, excluded=forget)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5)
               for sa, sb in zip(after, stage_states(scratch)) for a, b in zip(sa, sb) for k in a)
    assert model_logits(out, images.x_test).shape == (8, 4)


@pytest.mark.parametrize("method", ["finetune", "ga"])
def test_another_method_refuses_a_sisa_ensemble_with_or_without_a_store(files, tmp_path, capsys, method):
    """Any method but sisa would train the ensemble's stored slice checkpoints: refused in one line, nothing written."""
    out = tmp_path / "out.safetensors"
    assert main(["unlearn", "--dataset", "digits", "--method", method, "--model", str(files["sisa"]),
                 "--forget", str(files["ids"]), "--out", str(out)]) == 2
    store = AttributionStore.open_or_create(str(tmp_path / "store.zarr"), files["spec"], 100).url
    assert main(["unlearn", "--store", store, "--method", method, "--model", str(files["sisa"]),
                 "--forget", str(files["ids"]), "--out", str(out)]) == 2
    assert main(["unlearn", "--dataset", "digits", "--method", "sisa", "--model", str(files["sisa"]),
                 "--forget", str(files["ids"]), "--out", str(out), "--set", "shards=3"]) == 2
    *refused, fixed = capsys.readouterr().err.strip().splitlines()
    assert len(refused) == 2
    assert "shards is fixed when the model is trained (`dmm train`), not by a request; drop --set shards" in fixed
    for line in refused:
        assert "is a SISA ensemble (`dmm train --sisa`); unlearn it with --method sisa" in line
    assert not out.exists() and read_ledger(AttributionStore.open(store)) == []
