"""`dmm evaluate`: the unlearning evaluation of an experiment spec (KLoM against real oracles)."""
from __future__ import annotations

from pathlib import Path

from .commands_model import add_trust_code_arg


def evaluate_cmd(args) -> int:
    from .eval_report import markdown_table
    from .eval_spec import load_spec
    from .evaluate import run_evaluation

    spec = load_spec(args.config)
    result = run_evaluation(spec, args.out, address=args.address, trust_code=args.trust_code)
    columns = ("forget_set", "method", "klom95_forget", "klom95_retain", "klom95_heldout", "acc_forget",
               "ulira_auc", "cost_vs_retrain")
    print(markdown_table(result["rows"], columns))
    print(f"{result['stages'] - result['cached']} of {result['stages']} stages computed, {result['cached']} cached; "
          f"report in {Path(args.out) / 'report.md'}")
    if result["code"]["other"]:
        print(result["code"]["note"])
    print(f"wall time {result['seconds']:.0f} s; peak memory {result['peak_rss_bytes'] / 2**30:.2f} GiB "
          "(this process and its Ray workers)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="KLoM, accuracy, MIA, relearn time and cost of every method of a spec")
    p.add_argument("--config", required=True, help="experiment spec (YAML), e.g. configs/digits.yaml")
    p.add_argument("--out", required=True, help="folder for the report, the margins and the stage cache")
    p.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    add_trust_code_arg(p, "the spec or its store")
    p.set_defaults(func=evaluate_cmd)
