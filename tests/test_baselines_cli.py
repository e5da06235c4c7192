"""`dmm methods` and `dmm unlearn --method NAME --set key=value` for the baselines: with and without a
store, and bad input as one line (exit 2) that writes nothing."""
from __future__ import annotations

import numpy as np
import pytest

from attribution.checkpoint import load_model, model_meta, save_model
from attribution.datasets import load_dataset
from attribution.engine import train_batched
from attribution.recipes import RECIPES
from attribution.store import AttributionStore, StoreSpec
from cluster.cli import main
from matching.ledger import read_ledger
from matching.methods import METHOD_CONFIGS, METHODS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = RECIPES["digits-mlp"].with_epochs(3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """θ0 (digits mlp, 3 epochs) with its sidecar, an id file and an (unfitted) store for it."""
    base = tmp_path_factory.mktemp("baselines-cli")
    data = load_dataset("digits")
    trained = train_batched("mlp", data, RECIPE, [0], np.ones((1, data.n_train), bool))
    theta0 = base / "theta0.safetensors"
    save_model(theta0, trained.state_dict(0), model_meta(data, "mlp", RECIPE, 0))
    ids = base / "forget.txt"
    ids.write_text(" ".join(map(str, range(0, 300, 10))))
    spec = StoreSpec(dataset=data.name, fingerprint=data.fingerprint, model="mlp", recipe=RECIPE.to_dict(), alpha=0.5,
                     seed=0, block_size=100, n_train=data.n_train, n_points=data.n_points, num_classes=10)
    return dict(base=base, theta0=theta0, ids=ids, data=data, spec=spec)


def unlearn(files, out, *extra):
    return main(["unlearn", "--model", str(files["theta0"]), "--forget", str(files["ids"]), "--out", str(out),
                 *map(str, extra)])


def test_methods_lists_every_method_with_its_hyperparameters(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name} (" in f"\n{text}"
    assert "  mask_fraction: float = 0.5  # fraction of the weights" in text
    assert "  retain_ratio: float = 3.0  # r: match on F plus" in text  # DMM's flags keep their docs


def test_unlearn_without_a_store_writes_the_model_and_its_sidecar(files, tmp_path, capsys):
    out = tmp_path / "cf.safetensors"
    assert unlearn(files, out, "--dataset", "digits", "--method", "cf-k", "--set", "epochs=1",
                   "--set", "lr=2e-2") == 0
    assert "cf-k forgot 30 ids of digits (no store, no ledger)" in capsys.readouterr().out
    model, meta = load_model(out, files["data"])
    assert meta["unlearned"]["config"] == {**METHOD_CONFIGS["cf-k"]().to_dict(), "epochs": 1, "lr": 0.02}
    theta0, _ = load_model(files["theta0"], files["data"])
    assert (model.state_dict()["1.weight"] == theta0.state_dict()["1.weight"]).all()


def test_unlearn_with_a_store_records_the_method_and_its_config(files, tmp_path, capsys):
    store = AttributionStore.open_or_create(str(tmp_path / "store.zarr"), files["spec"], 100).url
    out = tmp_path / "ga.safetensors"
    assert unlearn(files, out, "--store", store, "--method", "ga", "--set", "epochs=2", "--set", "seed=4") == 0
    assert "request 1: ga forgot 30 new ids" in capsys.readouterr().out
    (entry,) = read_ledger(AttributionStore.open(store))
    assert entry.method == "ga" and entry.seed == 4 and entry.config["epochs"] == 2 and entry.stats["steps"] == 2


BAD = {
    # name: (argv, needle in the one-line error)
    "unknown key": (["--dataset", "digits", "--method", "salun", "--set", "sparsity=0.2"],
                    "method salun has no hyperparameter 'sparsity'; valid: lr (default 0.013)"),
    "bad type": (["--dataset", "digits", "--method", "scrub", "--set", "alpha=much"],
                 "method scrub: alpha is 'much'; give a float like the default 0.001 (keys: lr, epochs"),
    "bad value": (["--dataset", "digits", "--method", "eu-k", "--set", "k=0"], "k 0 must be >= 1"),
    "too many blocks": (["--dataset", "digits", "--method", "eu-k", "--set", "k=3"], "k = 3 but the model has 2"),
    "not key=value": (["--dataset", "digits", "--method", "ga", "--set", "epochs"], "is not key=value"),
    "dmm flag": (["--dataset", "digits", "--method", "finetune", "--lr", "0.1"], "--lr is a flag of dmm and om"),
    "needs a store": (["--dataset", "digits"], "method dmm needs an attribution store"),
    "no data": (["--method", "ga"], "without --store, name the data with --dataset"),
    "unknown method": (["--dataset", "digits", "--method", "forget-it"], "unknown method 'forget-it'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, case):
    argv, needle = BAD[case]
    out = tmp_path / "out.safetensors"
    assert unlearn(files, out, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dmm: error: ") and needle in err[0], err
    assert list(tmp_path.iterdir()) == []
