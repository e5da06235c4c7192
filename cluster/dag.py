"""A content-addressed stage DAG on Ray (DESIGN.md §3).

A `Stage` is a named call of a stage function with a JSON config and named parent stages. Its key is
sha256 over (function, config, parents' keys), so a stage's result is reused exactly when nothing
upstream of it changed. Results live in `<cache>/<function>/<key>/` with a `done.json` marker written
last (the directory is built under a temporary name and renamed into place), so an interrupted run
resumes and a spec that adds one stage recomputes only that stage and what depends on it. The marker
records the fingerprint of the code that computed the stage (`code_version`).

Every missing stage is one Ray task whose arguments are its parents' task results (Ray starts it when
they are ready); stages already in the cache are not submitted. A stage function has the signature
`fn(config: dict, out: Path, inputs: dict[str, Path]) -> None` and writes its files under `out`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ray
from tqdm import tqdm

from attribution.errors import DmmError

from .code_version import code_fingerprint
from .ray_runtime import first_line

DONE = "done.json"
StageFunction = Callable[[dict, Path, dict], None]


class StageError(DmmError):
    """A stage failed for good; finished stages stay cached and a rerun resumes."""


@dataclass(frozen=True)
class Stage:
    name: str                      # unique within the DAG, e.g. "oracles/random:50:0"
    function: str                  # key into the DAG's function table
    config: dict                   # JSON-serialisable: everything that fixes the result besides the parents
    parents: dict[str, str] = field(default_factory=dict)  # role -> parent stage name
    num_cpus: float = 1.0


def stage_key(function: str, config: dict, parent_keys: dict[str, str]) -> str:
    text = json.dumps({"function": function, "config": config, "parents": parent_keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def stage_keys(stages: list[Stage]) -> dict[str, str]:
    """Key of every stage, parents first; refuses unknown parents and cycles."""
    by_name = {s.name: s for s in stages}
    if len(by_name) != len(stages):
        raise StageError("two stages share a name; give every stage a unique name")
    keys: dict[str, str] = {}
    visiting: set[str] = set()

    def key(name: str) -> str:
        if name in keys:
            return keys[name]
        if name not in by_name:
            raise StageError(f"stage {name!r} is named as a parent but not defined; define it")
        if name in visiting:
            raise StageError(f"stage {name!r} depends on itself; break the cycle")
        visiting.add(name)
        s = by_name[name]
        keys[name] = stage_key(s.function, s.config, {role: key(p) for role, p in sorted(s.parents.items())})
        visiting.discard(name)
        return keys[name]

    for s in stages:
        key(s.name)
    return keys


def stage_dir(cache: Path, stage: Stage, key: str) -> Path:
    return cache / stage.function / key


def stage_paths(stages: list[Stage], cache: str | os.PathLike) -> dict[str, Path]:
    """Result directory of every stage: `<cache>/<function>/<key>`."""
    cache, keys = Path(cache).resolve(), stage_keys(stages)
    return {s.name: stage_dir(cache, s, keys[s.name]) for s in stages}


def is_done(path: Path) -> bool:
    return (path / DONE).is_file()


def stage_code(path: Path) -> str | None:
    """The fingerprint of the code that computed a finished stage (`code_version`; None: not recorded)."""
    return json.loads((path / DONE).read_text()).get("code")


def _execute(function: StageFunction, stage: Stage, path: str, *parent_paths: str) -> str:
    """Run one stage into a temporary directory and move it into place (idempotent on retries)."""
    final = Path(path)
    if is_done(final):
        return path
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    code = code_fingerprint()  # before the stage runs: nearest to when this worker imported the pipeline
    start = time.perf_counter()
    try:
        function(stage.config, tmp, {role: Path(p) for role, p in zip(sorted(stage.parents), parent_paths)})
        (tmp / DONE).write_text(json.dumps({"stage": stage.name, "seconds": round(time.perf_counter() - start, 3),
                                            "code": code}))
        if final.exists():  # a half-written directory of an earlier, interrupted attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def run_dag(stages: list[Stage], functions: dict[str, StageFunction], cache: str | os.PathLike,
            progress: bool = True) -> dict[str, Path]:
    """Run every stage whose result is not cached, as Ray tasks; returns stage name -> result directory."""
    for s in stages:
        if s.function not in functions:
            raise StageError(f"stage {s.name!r} uses unknown function {s.function!r}; use one of {sorted(functions)}")
    paths = stage_paths(stages, cache)
    refs: dict[str, object] = {}
    pending: dict[object, str] = {}
    remote = ray.remote(max_retries=2)(_execute)
    for s in _topological(stages):
        if is_done(paths[s.name]):
            continue
        parents = [refs.get(p, str(paths[p])) for _, p in sorted(s.parents.items())]
        ref = remote.options(num_cpus=s.num_cpus, name=s.name).remote(functions[s.function], s, str(paths[s.name]),
                                                                     *parents)
        refs[s.name] = ref
        pending[ref] = s.name
    done_before = len(stages) - len(pending)
    bar = tqdm(total=len(stages), initial=done_before, desc="stages", unit="stage", disable=not progress)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready[0])
            try:
                ray.get(ready[0])
            except ray.exceptions.RayError as e:
                for ref in pending:
                    ray.cancel(ref)
                cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause else e
                if isinstance(cause, DmmError):
                    raise type(cause)(f"stage {name}: {cause}") from None
                raise StageError(f"stage {name} failed ({first_line(cause)}); finished stages are kept, "
                                 "rerun the same command to resume") from None
            bar.update(1)
            bar.set_postfix_str(name, refresh=False)
    finally:
        bar.close()
    return paths


def _topological(stages: list[Stage]) -> list[Stage]:
    by_name = {s.name: s for s in stages}
    order: list[Stage] = []
    seen: set[str] = set()

    def visit(s: Stage) -> None:
        if s.name in seen:
            return
        seen.add(s.name)
        for p in s.parents.values():
            visit(by_name[p])
        order.append(s)

    for s in stages:
        visit(s)
    return order
