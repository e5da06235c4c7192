"""`dmm unlearn` (one deletion request, with any registered method), `dmm methods` (the methods and their
hyperparameters), `dmm ledger` (the request history) and `dmm direct` (DM-Direct's predicted logits).

`dmm unlearn --method NAME --set key=value …` sets a method's hyperparameters (values are read as JSON,
else as text: `--set lr=1e-3 --set k=2`); DMM and OM also take their historical flags (`--lr`, …).
With `--store` the request is checked against the store and recorded in its ledger; without one,
`--dataset` names the data and the unlearned model is written with a sidecar, nothing else.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np

from attribution.checkpoint import load_model, save_model
from attribution.datasets import check_dataset_name, load_dataset
from attribution.device import resolve_device
from attribution.evaluation import model_logits
from attribution.ids import read_ids
from attribution.recipes import Recipe
from attribution.store import FIT_PREFIXES, AttributionStore
from matching.baselines.config import field_docs
from matching.direct import dm_direct_prediction
from matching.errors import MatchingError
from matching.finetune import MatchingConfig
from matching.ledger import format_ledger, read_ledger
from matching.methods import METHOD_CONFIGS, METHOD_NEEDS, METHODS, UnlearnTask, check_model_for, get_method, unlearned_meta
from matching.request import DEFAULT_LOCK_TIMEOUT_S, unlearn_request

from .commands_model import add_device_arg, add_trust_code_arg
from .eval_methods import hyperparameters

# DMM/OM's flags: MatchingConfig field -> one-line doc (argparse help and `dmm methods`)
MATCHING_DOCS = {
    "lr": "Adam learning rate",
    "batch_size": "minibatch size",
    "lr_decay": "lr factor per epoch",
    "retain_ratio": "r: match on F plus r·|F| random retain points",
    "max_retain": "at most this many retain points (0: no cap; default 100, 50 on a cnn1d request that deletes "
                  "part of its classes, none on an mlp request that deletes whole classes)",
    "min_steps": "optimiser steps at the full lr at least",
    "anneal_steps": "after convergence, this many steps with the lr falling linearly to 0",
    "max_steps": "optimiser steps at most",
    "tol": "converged when the best matching loss fell by < tol × its start over --patience epochs",
    "patience": "epochs of the convergence window",
    "train_blocks": "k: only the last k blocks train (top-level modules with parameters; 0: every weight; default: "
                    "the model's, 2 on cnn1d, else 0)",
    "seed": "draws the retain points, the batch order and dmm's spread",
    "spread": "dmm: a, adding a·s_x·N(0, 1) to F's true-class targets (s_x: `dmm calibrate`; 0: DM-Direct's mean; "
              "default 1 where the store has s_x, else 0)",
}


MATCHING_TYPES = {f.name: f.type for f in fields(MatchingConfig)}  # a None default's type is its annotation's


def parse_sets(pairs: list[str]) -> dict:
    """`--set key=value` pairs as a dict; a value is JSON (1e-3, 2, true, [0.9, 0.99]) or else text."""
    params = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key:
            raise MatchingError(f"--set {pair!r} is not key=value; e.g. --set lr=0.01")
        try:
            params[key.strip()] = json.loads(text)
        except ValueError:
            params[key.strip()] = text
    return params


def method_config(args):
    """The hyperparameters of --method: DMM/OM flags, then --set, checked against the method's dataclass."""
    method = args.method
    get_method(method)
    flags = {k: getattr(args, k) for k in MATCHING_DOCS if getattr(args, k) is not None}
    if flags and METHOD_CONFIGS[method] is not MatchingConfig:
        first = next(iter(flags))
        raise MatchingError(f"--{first.replace('_', '-')} is a flag of dmm and om; for {method} use "
                            f"--set {first}=VALUE (see `dmm methods`)")
    sets = parse_sets(args.set or [])
    fixed = [k for k in getattr(METHOD_CONFIGS[method], "training_time", ()) if k in sets]
    if fixed:
        raise MatchingError(f"{fixed[0]} is fixed when the model is trained (`dmm train`), not by a request; "
                            f"drop --set {fixed[0]}")
    return METHOD_CONFIGS[method](**hyperparameters(method, {**flags, **sets}))


def unlearn_cmd(args) -> int:
    device = resolve_device(args.device)
    config = method_config(args)
    if args.store is None:
        print(unlearn_without_store(args, config, str(device)))
        return 0
    if args.dataset is not None:
        raise MatchingError("--dataset is for requests without --store (the store names its data); drop it")
    result = unlearn_request(args.store, args.model, args.forget, method=args.method, out=args.out,
                             attribution=args.attribution, config=config, oracles=args.oracles or (),
                             lock_timeout=args.lock_timeout, trust_code=args.trust_code, device=str(device))
    print(result.message)
    return 0


def unlearn_without_store(args, config, device: str) -> str:
    """Run a method that needs no store on a model file and write the result; no ledger is kept."""
    needs = METHOD_NEEDS[args.method] & {"store", "oracles"}
    if needs:
        raise MatchingError(f"method {args.method} needs an attribution store (its {' and '.join(sorted(needs))}); "
                            "pass --store")
    if args.dataset is None:
        raise MatchingError("without --store, name the data with --dataset (digits, mnist1d, cifar10, npz:PATH or npy:DIR)")
    if args.out is None or Path(args.out).resolve() == Path(args.model).resolve():
        raise MatchingError("pass --out, a new file for the unlearned model (not the input model)")
    check_dataset_name(args.dataset)
    data = load_dataset(args.dataset, download=True)
    ids = read_ids(args.forget, data.n_train, data.n_points)
    model, meta = load_model(args.model, data, trust_code=args.trust_code, device=device)
    check_model_for(args.method, model, args.model)
    task = UnlearnTask(model=model, data=data, forget_ids=ids, store=None,
                       original_logits=model_logits(model, data.all_inputs()).numpy(), config=config,
                       model_name=meta["model"], recipe=Recipe.from_dict(meta["recipe"]) if "recipe" in meta else None,
                       model_path=args.model)
    unlearned = METHODS[args.method](task)
    save_model(args.out, unlearned.model.state_dict(),
               unlearned_meta(meta, {"method": args.method, "config": config.to_dict(), "n_forgotten": int(ids.size),
                                     "forgotten": ids.tolist()}))
    return f"{args.method} forgot {ids.size} ids of {data.name} (no store, no ledger) -> {args.out}"


def methods_cmd(args) -> int:
    """Every registered method: its one-line doc, what it needs beyond (model, data, F), its hyperparameters."""
    for name in sorted(METHODS):
        needs = ", ".join(sorted(METHOD_NEEDS[name])) or "no store"
        print(f"{name} ({needs}): {(METHODS[name].__doc__ or '').strip().splitlines()[0]}")
        cls = METHOD_CONFIGS[name]
        for field, kind, default, doc in field_docs(cls):
            doc = doc or (MATCHING_DOCS.get(field, "") if cls is MatchingConfig else "")
            print(f"  {field}: {kind} = {default!r}" + (f"  # {doc}" if doc else ""))
    print("set them with `dmm unlearn --method NAME --set key=value ...`")
    return 0


def ledger_cmd(args) -> int:
    print(format_ledger(read_ledger(AttributionStore.open(args.store, mode="r"))))
    return 0


def direct_cmd(args) -> int:
    h = dm_direct_prediction(args.store, args.forget, args.model, args.attribution, trust_code=args.trust_code)
    np.save(args.out, h)
    fitted = AttributionStore.open(args.store).fit_group(args.attribution).targets
    only = (f"; {len(fitted.ids)} of {len(h)} points predicted (fitted with --targets {fitted.spec}), the other "
            f"{len(h) - len(fitted.ids)} rows are NaN") if fitted.is_subset else ""
    print(f"wrote DM-Direct logits {h.shape} (train points first) without the ids of {args.forget} -> {args.out}{only}")
    return 0


def register(sub) -> None:
    defaults = MatchingConfig()
    p = sub.add_parser("unlearn", help="forget training ids from a model with a registered method (default DMM)")
    p.add_argument("--store", help="attribution store (path or fsspec URL): checks the request and records it in "
                                   "the ledger; required by dmm and om")
    p.add_argument("--dataset", help="without --store: the model's data (digits | mnist1d | cifar10 | npz:PATH | npy:DIR)")
    p.add_argument("--model", required=True,
                   help="θ0 for the store's first request, else the model the previous request wrote")
    p.add_argument("--forget", required=True, help="file of training indices to forget (txt, csv or npy)")
    p.add_argument("--method", default="dmm", help=f"one of {', '.join(sorted(METHODS))} (default dmm; "
                                                   "see `dmm methods`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a hyperparameter of --method (repeatable; `dmm methods` lists them)")
    p.add_argument("--out", required=True, help="unlearned model file (.safetensors or .pt, with a .json sidecar)")
    p.add_argument("--attribution", default="datamodels", choices=FIT_PREFIXES,
                   help="fit group DMM's targets come from (default datamodels)")
    p.add_argument("--oracles", nargs="+", metavar="PATH", help="OM only: model files trained on S∖F")
    for field, doc in MATCHING_DOCS.items():
        default = getattr(defaults, field)
        kind = {"int | None": int, "float | None": float}[MATCHING_TYPES[field]] if default is None else type(default)
        p.add_argument(f"--{field.replace('_', '-')}", type=kind, default=None,
                       help=f"dmm/om: {doc}" + ("" if default is None else f" (default {default})"))
    p.add_argument("--lock-timeout", type=float, default=DEFAULT_LOCK_TIMEOUT_S,
                   help="seconds to wait for another request on the same store")
    add_device_arg(p)
    add_trust_code_arg(p, "the model files (and the store they must match)")
    p.set_defaults(func=unlearn_cmd)

    p = sub.add_parser("methods", help="list the unlearning methods, their hyperparameters and defaults")
    p.set_defaults(func=methods_cmd)

    p = sub.add_parser("direct", help="DM-Direct: predict the logits of a model retrained without some ids")
    p.add_argument("--store", required=True, help="attribution store with fitted datamodels (path or fsspec URL)")
    p.add_argument("--forget", required=True, help="file of training indices to forget (txt, csv or npy)")
    p.add_argument("--out", required=True, help="output .npy (points × k float32, train points first)")
    p.add_argument("--model", help="θ0 (default: the θ0 whose logits the store keeps from its first request)")
    p.add_argument("--attribution", default="datamodels", choices=FIT_PREFIXES,
                   help="fit group β comes from (default datamodels)")
    add_trust_code_arg(p, "the --model file (and the store it must match)")
    p.set_defaults(func=direct_cmd)

    p = sub.add_parser("ledger", help="print the deletion requests recorded in a store")
    p.add_argument("--store", required=True, help="attribution store (path or fsspec URL)")
    p.set_defaults(func=ledger_cmd)
