"""`dmm unlearn` (one deletion request against a store), `dmm ledger` (the request history) and
`dmm direct` (DM-Direct's predicted logits, with no model change)."""
from __future__ import annotations

import numpy as np

from attribution.device import resolve_device
from attribution.store import FIT_PREFIXES, AttributionStore
from matching.direct import dm_direct_prediction
from matching.finetune import MatchingConfig
from matching.ledger import format_ledger, read_ledger
from matching.methods import METHODS
from matching.request import DEFAULT_LOCK_TIMEOUT_S, unlearn_request

from .commands_model import add_device_arg, add_trust_code_arg


def unlearn_cmd(args) -> int:
    device = resolve_device(args.device)
    config = MatchingConfig(lr=args.lr, batch_size=args.batch_size, lr_decay=args.lr_decay,
                            retain_ratio=args.retain_ratio, min_steps=args.min_steps, max_steps=args.max_steps,
                            tol=args.tol, patience=args.patience, seed=args.seed)
    result = unlearn_request(args.store, args.model, args.forget, method=args.method, out=args.out,
                             attribution=args.attribution, config=config, oracles=args.oracles or (),
                             lock_timeout=args.lock_timeout, trust_code=args.trust_code, device=str(device))
    print(result.message)
    return 0


def ledger_cmd(args) -> int:
    print(format_ledger(read_ledger(AttributionStore.open(args.store, mode="r"))))
    return 0


def direct_cmd(args) -> int:
    h = dm_direct_prediction(args.store, args.forget, args.model, args.attribution, trust_code=args.trust_code)
    np.save(args.out, h)
    print(f"wrote DM-Direct logits {h.shape} (train points first) without the ids of {args.forget} -> {args.out}")
    return 0


def register(sub) -> None:
    defaults = MatchingConfig()
    p = sub.add_parser("unlearn", help="forget training ids from a model by datamodel matching (or OM)")
    p.add_argument("--store", required=True, help="attribution store with fitted datamodels (path or fsspec URL)")
    p.add_argument("--model", required=True,
                   help="θ0 for the store's first request, else the model the previous request wrote")
    p.add_argument("--forget", required=True, help="file of training indices to forget (txt, csv or npy)")
    p.add_argument("--method", default="dmm", help=f"one of {', '.join(sorted(METHODS))} (default dmm)")
    p.add_argument("--out", required=True, help="unlearned model file (.safetensors or .pt, with a .json sidecar)")
    p.add_argument("--attribution", default="datamodels", choices=FIT_PREFIXES,
                   help="fit group DMM's targets come from (default datamodels)")
    p.add_argument("--oracles", nargs="+", metavar="PATH", help="OM only: model files trained on S∖F")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr-decay", type=float, default=defaults.lr_decay, help="lr factor per epoch")
    p.add_argument("--retain-ratio", type=float, default=defaults.retain_ratio,
                   help="r: match on F plus r·|F| random retain points")
    p.add_argument("--min-steps", type=int, default=defaults.min_steps, help="optimiser steps at least")
    p.add_argument("--max-steps", type=int, default=defaults.max_steps, help="optimiser steps at most")
    p.add_argument("--tol", type=float, default=defaults.tol,
                   help="converged when the best matching loss fell by < tol × its start over --patience epochs")
    p.add_argument("--patience", type=int, default=defaults.patience, help="epochs of the convergence window")
    p.add_argument("--seed", type=int, default=defaults.seed, help="draws the retain points and batch order")
    p.add_argument("--lock-timeout", type=float, default=DEFAULT_LOCK_TIMEOUT_S,
                   help="seconds to wait for another request on the same store")
    add_device_arg(p)
    add_trust_code_arg(p, "the model files (and the store they must match)")
    p.set_defaults(func=unlearn_cmd)

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
