"""Which code computed a stage: a fingerprint of the pipeline's sources, kept in every stage's `done.json`.

A stage's key follows its config and its parents', not the code (a refactor keeps the cache, DESIGN.md §3). So a
cache can hold stages that other code computed: an older version of the pipeline, or a working tree edited while
a run's Ray workers imported it. A retrain on other code may round otherwise, and a trained network amplifies
that, so such a stage need not match what a fresh run writes. The fingerprint lets `dmm evaluate` say so.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable

PACKAGES = ("attribution", "matching", "cluster")  # the sources a stage function runs
UNRECORDED = "unrecorded"  # a stage cached before fingerprints were kept
SHOWN = 12  # hex digits of a fingerprint in messages


def source_fingerprint(roots: Iterable[Path]) -> str:
    """sha256 over every `*.py` file under `roots`, ordered by its path from its root's name ("cluster/dag.py"):
    each file's path and its bytes' sha256."""
    files = sorted((f"{root.name}/{path.relative_to(root).as_posix()}", path)
                   for root in roots for path in root.rglob("*.py"))
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """The fingerprint of this process's pipeline sources, read from disk once, at the first call."""
    top = Path(__file__).resolve().parents[1]
    return source_fingerprint(top / package for package in PACKAGES)


def other_code(stage_codes: dict[str, str | None], current: str) -> dict[str, str]:
    """{stage name: its fingerprint, or UNRECORDED} of the stages not computed by `current`."""
    return {name: code or UNRECORDED for name, code in stage_codes.items() if code != current}


def provenance(current: str, others: dict[str, str], stages: int) -> str:
    """One sentence for the report and the command line: which code computed the stages."""
    if not others:
        return f"Code `{current[:SHOWN]}` (sha256 of the pipeline's sources) computed every stage."
    counts = ", ".join(f"`{code[:SHOWN]}`: {n}" for code, n in sorted(Counter(others.values()).items()))
    return (f"Code `{current[:SHOWN]}` (sha256 of the pipeline's sources) read this cache, but {len(others)} of "
            f"{stages} stages were computed by other code ({counts}) and may differ from a fresh run's in float "
            "rounding; a fresh --out recomputes every stage with this code.")
