"""The content-addressed stage DAG on Ray: keys, caching, partial recomputation, resume after a failure."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from ray import cloudpickle

from cluster.code_version import code_fingerprint
from cluster.dag import Stage, StageError, run_dag, stage_code, stage_keys


def count_stage(config: dict, out: Path, inputs: dict) -> None:
    """value = config's own value + the values of the parents; logs every execution in config['log']."""
    with open(config["log"], "a") as f:
        f.write(config["id"] + "\n")
    if config.get("fail"):
        raise RuntimeError("planted failure")
    total = config["value"] + sum(json.loads((p / "value.json").read_text()) for p in inputs.values())
    (out / "value.json").write_text(json.dumps(total))


FUNCTIONS = {"count": count_stage}
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module


def dag(log, values=(1, 2, 3), fail_c=False, extra=False):
    a, b, c = values
    stages = [Stage("a", "count", {"id": "a", "value": a, "log": str(log)}),
              Stage("b", "count", {"id": "b", "value": b, "log": str(log)}, {"x": "a"}),
              Stage("c", "count", {"id": "c", "value": c, "log": str(log), "fail": fail_c}, {"x": "a", "y": "b"})]
    if extra:
        stages.append(Stage("d", "count", {"id": "d", "value": 10, "log": str(log)}, {"x": "c"}))
    return stages


def executions(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def value(paths, name) -> int:
    return json.loads((paths[name] / "value.json").read_text())


def test_keys_follow_config_and_parents():
    log = "unused"
    base = stage_keys(dag(log))
    changed = stage_keys(dag(log, values=(5, 2, 3)))
    assert all(base[n] != changed[n] for n in "abc")  # a changed, so did everything downstream
    leaf = stage_keys(dag(log, values=(1, 2, 4)))
    assert base["a"] == leaf["a"] and base["b"] == leaf["b"] and base["c"] != leaf["c"]


def test_a_rerun_recomputes_nothing_and_a_new_stage_only_itself(ray_session, tmp_path):
    log = tmp_path / "log"
    paths = run_dag(dag(log), FUNCTIONS, tmp_path / "cache", progress=False)
    assert value(paths, "a") == 1 and value(paths, "b") == 3 and value(paths, "c") == 1 + 3 + 3
    assert sorted(executions(log)) == ["a", "b", "c"]
    run_dag(dag(log), FUNCTIONS, tmp_path / "cache", progress=False)
    assert sorted(executions(log)) == ["a", "b", "c"]
    paths = run_dag(dag(log, extra=True), FUNCTIONS, tmp_path / "cache", progress=False)
    assert sorted(executions(log)) == ["a", "b", "c", "d"] and value(paths, "d") == 17
    run_dag(dag(log, values=(1, 2, 4)), FUNCTIONS, tmp_path / "cache", progress=False)
    assert sorted(executions(log)) == ["a", "b", "c", "c", "d"]
    assert {stage_code(p) for p in paths.values()} == {code_fingerprint()}  # the workers' code is the driver's


def test_a_failed_stage_keeps_finished_ones_and_a_rerun_resumes(ray_session, tmp_path):
    log = tmp_path / "log"
    with pytest.raises(StageError, match="stage c failed .*planted failure.*rerun the same command"):
        run_dag(dag(log, fail_c=True), FUNCTIONS, tmp_path / "cache", progress=False)
    assert executions(log).count("a") == 1 and executions(log).count("b") == 1
    assert not list((tmp_path / "cache" / "count").glob(".*"))  # no half-written directory is left
    before = len(executions(log))
    paths = run_dag(dag(log), FUNCTIONS, tmp_path / "cache", progress=False)
    assert executions(log)[before:] == ["c"] and value(paths, "c") == 7


def test_malformed_dags_are_refused():
    with pytest.raises(StageError, match="not defined"):
        stage_keys([Stage("a", "count", {}, {"x": "missing"})])
    with pytest.raises(StageError, match="depends on itself"):
        stage_keys([Stage("a", "count", {}, {"x": "b"}), Stage("b", "count", {}, {"x": "a"})])
    with pytest.raises(StageError, match="unique name"):
        stage_keys([Stage("a", "count", {}), Stage("a", "count", {"v": 1})])
