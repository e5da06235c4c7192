"""`dmm train`, `dmm predict` (one model at a time) and `dmm recipes` (the named recipes).

The option helpers here are the one definition of options several commands share: the dataset and
model, the recipe options, `--device` and `--trust-code`.
"""
from __future__ import annotations

import json

import numpy as np

from attribution.checkpoint import load_model, model_meta, save_model
from attribution.datasets import DEFAULT_DATASET, check_dataset_name, load_dataset
from attribution.device import resolve_device
from attribution.engine import train_model
from attribution.evaluation import accuracy, model_logits
from attribution.ids import read_ids
from attribution.models import default_model
from attribution.recipes import RECIPE_FILE_SUFFIXES, RECIPES, Recipe, recipe_pairs, resolve_recipe
from attribution.sisa import parse_shape, train_sisa
from attribution.update_record import UpdateRecorder, UpdateRecordError


def add_data_args(p, model=True) -> None:
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="digits | mnist1d | cifar10 | npz:PATH | npy:DIR")
    if model:
        p.add_argument("--model", default=None, help="mlp | cnn1d | resnet9 | module:callable (default: the dataset's)")


def add_recipe_args(p) -> None:
    """The recipe options of every command that trains models (`dmm train`, `dmm estimate`)."""
    p.add_argument("--recipe", help="a named recipe (see `dmm recipes`) or a .json/.yaml file of Recipe fields "
                                    "(default: the (dataset, model) pair's; required where the pair has none)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs, the one-cycle peak scaled with them "
                                              "(recorded with the model or store)")


def model_and_recipe(args) -> tuple[str, Recipe]:
    """(model name, recipe) from --dataset, --model and the recipe options, checked before any data is loaded."""
    check_dataset_name(args.dataset)
    model = args.model or default_model(args.dataset)
    return model, resolve_recipe(args.dataset, model, args.recipe, args.epochs)


def add_device_arg(p) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] where a GPU is present")


def add_trust_code_arg(p, files: str) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help=f"consent to import a module:callable model that {files} names (runs that module's "
                        "code: only for files you trust)")


def update_recorder(args) -> UpdateRecorder | None:
    """The amnesiac update record `--record-updates` / `--record-keep` ask for (None without them)."""
    if not args.record_updates and args.record_keep is None:
        return None
    if args.sisa:
        raise UpdateRecordError("--record-updates records one model's training, not a SISA ensemble; drop one")
    return UpdateRecorder(args.out, 1.0 if args.record_keep is None else args.record_keep)


def train_cmd(args) -> int:
    device = resolve_device(args.device)
    model_name, recipe = model_and_recipe(args)
    recorder = update_recorder(args)  # checked before any data is read or file written
    data = load_dataset(args.dataset, download=True)  # the user named it: a missing archive may be fetched
    mask = None
    excluded = []
    if args.exclude:
        excluded = read_ids(args.exclude, data.n_train, data.n_points)
        mask = np.ones(data.n_train, dtype=bool)
        mask[excluded] = False
    meta = model_meta(data, model_name, recipe, args.seed, excluded=[int(i) for i in excluded])
    if args.sisa:
        model, _ = train_sisa(model_name, data, recipe, args.seed, *args.sisa, excluded, device)
        meta["sisa"] = model.manifest(recipe)
    else:
        model = train_model(model_name, data, recipe, args.seed, mask, device, recorder=recorder)
        if recorder is not None:
            meta["update_record"] = recorder.finish()
    save_model(args.out, model.state_dict(), meta)
    acc = accuracy(model_logits(model, data.x_test), data.y_test)
    held_out = f"held-out accuracy {acc:.4f}"
    if args.sisa:
        vote = float((model.predict(data.x_test.to(device)).cpu() == data.y_test).float().mean())
        held_out = (f"SISA {args.sisa[0]}x{args.sisa[1]}: held-out accuracy {vote:.4f} by vote "
                    f"({acc:.4f} by mean logits)")
    print(f"{held_out} ({data.name}, {model_name}, seed {args.seed}) -> {args.out}")
    if recorder is not None:
        print(recorder.summary())
    return 0


def predict_cmd(args) -> int:
    device = resolve_device(args.device)
    model, meta = load_model(args.model, trust_code=args.trust_code, device=device)
    data = load_dataset(meta["dataset"])
    logits = model_logits(model, data.all_inputs()).numpy().astype(np.float32)
    np.save(args.out, logits)
    print(f"wrote logits {logits.shape} (train points first) -> {args.out}")
    return 0


def recipes_cmd(args) -> int:
    for name, recipe in RECIPES.items():
        pairs = ", ".join(f"dataset {d} with model {m}" for d, m in recipe_pairs(name))
        print(f"{name}: default for {pairs or 'no pair'}\n  {json.dumps(recipe.to_dict())}")
    print(f"--recipe NAME picks one; --recipe FILE ({'/'.join(RECIPE_FILE_SUFFIXES)}) gives fields, the rest "
          f"taking Recipe's defaults {json.dumps(Recipe().to_dict())}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train one model with a recipe (default: the (dataset, model) pair's)")
    add_data_args(p)
    add_recipe_args(p)
    add_device_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="model file (.safetensors, or .pt); a .json sidecar is written beside it")
    p.add_argument("--exclude", help="file of training indices to leave out (txt, csv or npy)")
    p.add_argument("--sisa", type=parse_shape, metavar="SHARDS,SLICES",
                   help="train a SISA ensemble: S shards x R slices, a checkpoint after each slice, all in the model "
                        "file (for `dmm unlearn --method sisa`)")
    p.add_argument("--record-updates", action="store_true",
                   help="record every batch's parameter update and ids in <out>.updates/ (for `dmm unlearn --method "
                        "amnesiac`)")
    p.add_argument("--record-keep", type=float, metavar="FRACTION",
                   help="keep only the top FRACTION of each update by |Δ| per parameter tensor (layer-wise partial "
                        "amnesiac; implies --record-updates) and print the bytes the record takes")
    p.set_defaults(func=train_cmd)

    p = sub.add_parser("predict", help="write a model's logits on every train and held-out point")
    p.add_argument("--model", required=True, help="model file written by `dmm train`")
    p.add_argument("--out", required=True, help="output .npy (points × k float32, train points first)")
    add_device_arg(p)
    add_trust_code_arg(p, "the model's sidecar")
    p.set_defaults(func=predict_cmd)

    p = sub.add_parser("recipes", help="list the named training recipes, the (dataset, model) pairs they serve "
                                       "and their fields")
    p.set_defaults(func=recipes_cmd)
