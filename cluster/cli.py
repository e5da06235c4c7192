"""`dmm`: the command line. Each stage module registers its own sub-command.

Input errors (`DmmError`) print one line `dmm: error: …` on stderr and exit with status 2.

Every command starts by importing this module and all command modules, so none of them imports the packages
in `DEFERRED_IMPORTS` at import time; the functions that use them import them
(`benchmarks/bench_cli_start.py`: `dmm --help` in about 3 s instead of 5.5 s on this project's 2-core machine).
"""
from __future__ import annotations

import argparse
import sys

from attribution.errors import DmmError

from . import (commands_calibrate, commands_estimate, commands_evaluate, commands_fit, commands_model, commands_trak,
               commands_unlearn, demo)

DEFERRED_IMPORTS = ("ray", "dask", "dask.array", "scipy.stats")  # not imported by `import cluster.cli`
COMMAND_MODULES = [commands_model, commands_estimate, commands_fit, commands_trak, commands_calibrate, commands_unlearn,
                   commands_evaluate, demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmm", description="Machine unlearning by datamodel matching.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DmmError as e:
        print(f"dmm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dmm: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
