"""`dmm train` and `dmm predict`: one model at a time."""
from __future__ import annotations

import numpy as np

from attribution.checkpoint import load_model, model_meta, save_model
from attribution.datasets import DEFAULT_DATASET, load_dataset
from attribution.engine import train_model
from attribution.evaluation import accuracy, model_logits
from attribution.ids import read_ids
from attribution.models import default_model
from attribution.recipes import default_recipe


def add_data_args(p, model=True) -> None:
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="digits | mnist1d | cifar10 | npz:PATH")
    if model:
        p.add_argument("--model", default=None, help="mlp | cnn1d | resnet9 | module:callable (default: the dataset's)")


def train_cmd(args) -> int:
    data = load_dataset(args.dataset)
    model_name = args.model or default_model(data.name)
    recipe = default_recipe(data.name)
    mask = None
    excluded = []
    if args.exclude:
        excluded = read_ids(args.exclude, data.n_train, data.n_points)
        mask = np.ones(data.n_train, dtype=bool)
        mask[excluded] = False
    model = train_model(model_name, data, recipe, args.seed, mask)
    meta = model_meta(data, model_name, recipe, args.seed, excluded=[int(i) for i in excluded])
    save_model(args.out, model.state_dict(), meta)
    acc = accuracy(model_logits(model, data.x_test), data.y_test)
    print(f"held-out accuracy {acc:.4f} ({data.name}, {model_name}, seed {args.seed}) -> {args.out}")
    return 0


def predict_cmd(args) -> int:
    model, meta = load_model(args.model)
    data = load_dataset(meta["dataset"])
    logits = model_logits(model, data.all_inputs()).numpy().astype(np.float32)
    np.save(args.out, logits)
    print(f"wrote logits {logits.shape} (train points first) -> {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train one model with the dataset's default recipe")
    add_data_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="model file (.safetensors, or .pt); a .json sidecar is written beside it")
    p.add_argument("--exclude", help="file of training indices to leave out (txt, csv or npy)")
    p.set_defaults(func=train_cmd)

    p = sub.add_parser("predict", help="write a model's logits on every train and held-out point")
    p.add_argument("--model", required=True, help="model file written by `dmm train`")
    p.add_argument("--out", required=True, help="output .npy (points × k float32, train points first)")
    p.set_defaults(func=predict_cmd)
