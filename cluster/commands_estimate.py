"""`dmm estimate`, `dmm status` and `dmm submit`: the subset models of the datamodels, on Ray.

Ray is imported by the commands that use it, so the other `dmm` commands start without it.
"""
from __future__ import annotations

import argparse
import json

from attribution.errors import DmmError
from attribution.store import AttributionStore

from .commands_model import add_data_args, add_recipe_args, model_and_recipe


def request_from_args(args):
    """The EstimateRequest of `dmm estimate`'s options (model and recipe resolved as `dmm train` does)."""
    from .estimate import EstimateRequest

    model, recipe = model_and_recipe(args)
    return EstimateRequest(args.dataset, model, recipe, alpha=args.alpha, seed=args.seed, block_size=args.block_size)


def estimate_cmd(args) -> int:
    from .estimate import run_estimate

    request = request_from_args(args)
    result = run_estimate(request, args.store, args.num_models, address=args.address,
                          cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task)
    s = result.store
    print(f"trained {result.trained} blocks, skipped {result.skipped}; "
          f"{s.completed_models()}/{s.allocated_models} models in {s.url}")
    return 0


def status_cmd(args) -> int:
    summary = AttributionStore.open(args.store).summary()
    print(f"models: {summary['completed_models']}/{summary['allocated_models']} completed "
          f"({summary['completed_blocks']}/{summary['num_blocks']} blocks of {summary['block_size']}; "
          f"{summary['num_models']} requested)")
    for key, value in summary.items():
        print(f"{key}: {value if isinstance(value, str) else json.dumps(value, sort_keys=True)}")
    return 0


def submit_cmd(args) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if bool(argv) == bool(args.logs):
        raise DmmError("give either a command (`dmm submit --address URL -- estimate …`) or --logs JOB")
    from .submit import follow, submit

    if args.logs:
        status = follow(args.address, args.logs)
        print(f"job {args.logs}: {status.value}")
        return 0 if status == "SUCCEEDED" else 1
    from .cli import build_parser

    build_parser().parse_args(argv)  # a typo fails here, not on the cluster
    print(submit(args.address, argv))
    return 0


def register(sub) -> None:
    p = sub.add_parser("estimate", help="train the m subset models of the datamodels into an attribution store (Ray)")
    add_data_args(p)
    p.add_argument("--num-models", type=int, required=True, help="m, the number of subset models (may grow a store)")
    p.add_argument("--alpha", type=float, default=0.5, help="subset fraction α (default 0.5)")
    p.add_argument("--store", required=True, help="attribution store: a path or fsspec URL")
    p.add_argument("--block-size", type=int, default=64, help="B, models per Ray task (default 64)")
    p.add_argument("--seed", type=int, default=0, help="root seed of the subsets and model seeds")
    p.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else a local Ray started in-process)")
    p.add_argument("--gpus-per-task", type=float, default=0.0,
                   help="G > 0: one worker per GPU slot keeps the dataset on its GPU across blocks; a fraction "
                        "shares a GPU (DMM_FORCE_DEVICE=cpu: compute on the CPU; default 0, CPU tasks)")
    p.add_argument("--cpus-per-task", type=float, default=1.0,
                   help="CPUs per task or GPU worker; it uses max(1, int(C)) torch threads (default 1)")
    add_recipe_args(p)
    p.set_defaults(func=estimate_cmd)

    p = sub.add_parser("status", help="completed/total subset models and the attributes of a store")
    p.add_argument("--store", required=True)
    p.set_defaults(func=status_cmd)

    p = sub.add_parser("submit", help="run a dmm command as a Ray job on a cluster, or follow a job's logs")
    p.add_argument("--address", help="the cluster's dashboard, http://HOST:8265 (default: RAY_ADDRESS)")
    p.add_argument("--logs", metavar="JOB", help="follow the logs of job JOB until it ends")
    p.add_argument("argv", nargs=argparse.REMAINDER,
                   help="-- then the dmm command, e.g. -- estimate --num-models 1000 --store /shared/s "
                        "(paths are read on the cluster)")
    p.set_defaults(func=submit_cmd)
