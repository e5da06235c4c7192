"""Recipes keyed by (dataset, model) (attribution/recipes.py), `--recipe NAME|FILE`, `--epochs` on
`dmm train` as on `dmm estimate`, and `dmm recipes` (cluster/commands_model.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attribution.models import ModelError, default_model
from attribution.recipes import RECIPES, Recipe, RecipeError, default_recipe, named_recipe, resolve_recipe
from cluster.cli import build_parser, main
from cluster.commands_estimate import request_from_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sidecar(path):
    return json.loads((path.parent / (path.name + ".json")).read_text())


def one_line_error(capsys, argv, *needles) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dmm: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data" / "d.npz"
    path.parent.mkdir()
    np.savez(path, x_train=rng.normal(size=(40, 4)), y_train=rng.integers(0, 2, 40),
             x_test=rng.normal(size=(10, 4)), y_test=rng.integers(0, 2, 10))
    return f"npz:{path}"


# ---------------------------------------------------------------- the lookup

def test_each_registered_pair_has_its_named_recipe():
    assert default_recipe("digits", "mlp") is RECIPES["digits-mlp"]
    assert default_recipe("mnist1d", "cnn1d") is RECIPES["mnist1d-cnn1d"]
    assert default_recipe("cifar10", "resnet9") is RECIPES["cifar10-resnet9"]
    assert default_recipe("digits") is RECIPES["digits-mlp"]  # the dataset's default model
    assert RECIPES["cifar10-resnet9"].label_smoothing == 0.1 and RECIPES["digits-mlp"].epochs == 20


@pytest.mark.parametrize("dataset, model", [("npz:/x.npz", "mlp"), ("digits", "resnet9"), ("mnist1d", "mlp"),
                                            ("digits", "pkg.mod:factory")])
def test_a_pair_without_a_default_must_name_a_recipe(dataset, model):
    with pytest.raises(RecipeError) as e:
        default_recipe(dataset, model)
    msg = str(e.value)
    assert "\n" not in msg and model in msg and dataset in msg and "--recipe" in msg and "digits-mlp" in msg


def test_an_unknown_dataset_has_no_default_model():
    with pytest.raises(ModelError) as e:
        default_model("npz:/x.npz")
    assert "\n" not in str(e.value) and "--model" in str(e.value) and "npz:/x.npz" in str(e.value)


def test_epochs_override_keeps_the_schedule_shape():
    base = RECIPES["digits-mlp"]  # one-cycle, peak at epoch 2 of 20
    short = resolve_recipe("digits", "mlp", epochs=5)
    assert short == base.with_(epochs=5, peak_epoch=0.5)
    assert resolve_recipe("digits", "mlp", epochs=20) is base
    assert resolve_recipe("npz:/x.npz", "mlp", "digits-mlp", epochs=5) == short
    for bad in (0, -1, True):
        with pytest.raises(RecipeError, match="epochs"):
            base.with_epochs(bad)


# ---------------------------------------------------------------- recipe files

def test_json_and_yaml_files_give_the_same_recipe(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"epochs": 3, "lr": 0.05, "optimizer": "adam",
                                                 "betas": [0.8, 0.99], "schedule": "cosine"}))
    (tmp_path / "r.yaml").write_text("epochs: 3\nlr: 5.0e-2\noptimizer: adam\nbetas: [0.8, 0.99]\nschedule: cosine\n")
    want = Recipe(epochs=3, lr=0.05, optimizer="adam", betas=(0.8, 0.99), schedule="cosine")
    assert named_recipe(str(tmp_path / "r.json")) == want
    assert named_recipe(str(tmp_path / "r.yaml")) == want
    assert named_recipe("mnist1d-cnn1d") is RECIPES["mnist1d-cnn1d"]


@pytest.mark.parametrize("name, text, needles", [
    ("r.json", '{"epochs": 3,', ["r.json", "JSON"]),
    ("r.yaml", "epochs: [3\n", ["r.yaml", "YAML"]),
    ("r.json", "[3, 4]", ["mapping"]),
    ("r.json", '{"epoch": 3}', ["epoch", "unknown"]),
    ("r.json", '{"epochs": "3"}', ["epochs", "int"]),
    ("r.json", '{"epochs": 2.5}', ["epochs", "int"]),
    ("r.json", '{"nesterov": "yes"}', ["nesterov", "bool"]),
    ("r.json", '{"betas": [0.9]}', ["betas"]),
    ("r.yaml", "lr: 1e-3\n", ["lr", "1.0e-3"]),  # YAML 1.1 reads 1e-3 as a string
    ("r.json", '{"optimizer": "rmsprop"}', ["rmsprop"]),
    ("r.txt", '{"epochs": 3}', ["unknown recipe", "r.txt"]),
])
def test_bad_recipe_files_are_one_line_errors(tmp_path, name, text, needles):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        named_recipe(str(path))
    assert "\n" not in str(e.value)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_a_missing_recipe_file_or_name(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe file .*none.yaml"):
        named_recipe(str(tmp_path / "none.yaml"))
    with pytest.raises(RecipeError, match="unknown recipe 'digits'.*digits-mlp"):
        named_recipe("digits")


# ---------------------------------------------------------------- dmm train

@pytest.mark.parametrize("extra, needles", [([], ["no default model", "--model"]),
                                            (["--model", "mlp"], ["no default recipe", "--recipe", "digits-mlp"]),
                                            (["--model", "resnet9"], ["no default recipe", "resnet9"])])
def test_npz_without_a_recipe_is_refused_and_writes_nothing(tmp_path, capsys, npz, extra, needles):
    out = tmp_path / "out" / "m.safetensors"
    one_line_error(capsys, ["train", "--dataset", npz, *extra, "--out", out], *needles)
    assert not out.parent.exists()


def test_a_registered_dataset_with_another_model_needs_a_recipe(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    one_line_error(capsys, ["train", "--dataset", "digits", "--model", "resnet9", "--out", out], "resnet9", "--recipe")
    assert list(tmp_path.iterdir()) == []


def test_recipe_name_and_files_land_in_the_sidecar(tmp_path, npz):
    (tmp_path / "r.json").write_text(json.dumps({"epochs": 3, "lr": 0.05, "batch_size": 16}))
    (tmp_path / "r.yml").write_text("epochs: 3\nlr: 0.05\nbatch_size: 16\n")
    from_file = Recipe(epochs=3, lr=0.05, batch_size=16).to_dict()
    for i, (recipe, want) in enumerate([("digits-mlp", RECIPES["digits-mlp"].to_dict()),
                                        (tmp_path / "r.json", from_file), (tmp_path / "r.yml", from_file)]):
        out = tmp_path / f"m{i}.safetensors"
        assert main(["train", "--dataset", npz, "--model", "mlp", "--recipe", str(recipe), "--out", str(out)]) == 0
        meta = sidecar(out)
        assert meta["recipe"] == want and meta["dataset"] == npz and meta["model"] == "mlp"


def test_train_epochs_matches_what_estimate_stores(tmp_path):
    out = tmp_path / "m.safetensors"
    assert main(["train", "--dataset", "digits", "--epochs", "3", "--out", str(out)]) == 0
    args = build_parser().parse_args(["estimate", "--dataset", "digits", "--num-models", "4", "--store",
                                      str(tmp_path / "s"), "--epochs", "3"])
    stored = request_from_args(args).recipe.to_dict()
    assert sidecar(out)["recipe"] == stored
    assert stored["epochs"] == 3 and stored["peak_epoch"] == pytest.approx(0.3)
    assert not (tmp_path / "s").exists()


def test_estimate_takes_the_same_recipe_options(tmp_path):
    args = build_parser().parse_args(["estimate", "--dataset", "npz:/x.npz", "--model", "mlp", "--recipe",
                                      "digits-mlp", "--epochs", "4", "--num-models", "4", "--store", "s"])
    request = request_from_args(args)
    assert (request.model, request.recipe) == ("mlp", RECIPES["digits-mlp"].with_epochs(4))


def test_train_with_a_bad_recipe_option_writes_nothing(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    one_line_error(capsys, ["train", "--recipe", "nosuch", "--out", out], "nosuch", "digits-mlp")
    one_line_error(capsys, ["train", "--epochs", "0", "--out", out], "epochs")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- dmm recipes

def test_recipes_lists_every_named_recipe_with_its_pair_and_fields(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, recipe in RECIPES.items():
        i = next(i for i, line in enumerate(lines) if line.startswith(f"{name}: "))
        assert json.loads(lines[i + 1]) == recipe.to_dict()
    assert "digits-mlp: default for dataset digits with model mlp" in lines
    assert "mnist1d-cnn1d: default for dataset mnist1d with model cnn1d" in lines
    assert "cifar10-resnet9: default for dataset cifar10 with model resnet9" in lines
    assert json.dumps(Recipe().to_dict()) in lines[-1]
