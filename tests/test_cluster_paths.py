"""Cluster paths (cluster/estimate.py, cluster/fit.py): task sizes no node has are refused on one line
before the store changes, workers open the store by its absolute URL whatever the driver's cwd, and
every `dmm …` named in a message is a real sub-command."""
from __future__ import annotations

import argparse
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import ray

from attribution.store import AttributionStore
from attribution.datasets import load_dataset
from cluster.cli import COMMAND_MODULES, main
from cluster.estimate import EstimateRequest, train_block
from cluster.fit import FitConfig, fit_store
from fixtures_store import tree_hashes

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(epochs=2, block_size=4)


def estimate_in_thread(argv: list[str], wait_s: float = 120) -> int:
    """`dmm estimate …` in a thread, so that a regression that queues tasks forever fails instead of hanging."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(rc=main(argv)), daemon=True)
    thread.start()
    thread.join(timeout=wait_s)
    assert not thread.is_alive(), "dmm estimate is still waiting for a task no node can run"
    return out["rc"]


@pytest.mark.parametrize("existing", [False, True], ids=["new store", "store short of models"])
@pytest.mark.parametrize("resource", ["gpus", "cpus"])
def test_a_task_size_no_node_has_is_refused_before_the_store_changes(ray_session, tmp_path, capsys, resource, existing):
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    gpus = max(n.get("GPU", 0) for n in nodes) + 1 if resource == "gpus" else 0  # 1 on a machine without GPUs
    cpus = max(n.get("CPU", 0) for n in nodes) + 1 if resource == "cpus" else 1
    store = tmp_path / "s"
    if existing:
        AttributionStore.open_or_create(store, EstimateRequest.build("digits", **TINY).spec(load_dataset("digits")), 4)
    before = tree_hashes(tmp_path)
    rc = estimate_in_thread(["estimate", "--dataset", "digits", "--num-models", "8", "--store", str(store),
                             "--epochs", "2", "--block-size", "4", "--gpus-per-task", str(gpus),
                             "--cpus-per-task", str(cpus)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"dmm: error: no node of the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs for one task")
    assert "--gpus-per-task" in err and tree_hashes(tmp_path) == before and store.exists() == existing


def small_digits(path: Path) -> str:
    """4 training and 2 held-out digits per class, as `npz:PATH` (datamodel fits of 60 targets × 10 are instant)."""
    d = load_dataset("digits")
    tr = np.concatenate([np.flatnonzero(d.y_train.numpy() == c)[:4] for c in range(10)])
    te = np.concatenate([np.flatnonzero(d.y_test.numpy() == c)[:2] for c in range(10)])
    np.savez(path, x_train=d.x_train.numpy()[tr], y_train=d.y_train.numpy()[tr],
             x_test=d.x_test.numpy()[te], y_test=d.y_test.numpy()[te])
    return f"npz:{path}"


def test_fit_workers_open_the_store_by_its_absolute_url(ray_session, tmp_path, monkeypatch):
    """A relative --store given in another cwd than the Ray workers': every fit chunk still lands in it."""
    request = EstimateRequest.build(small_digits(tmp_path / "d.npz"), "mlp", recipe="digits-mlp", **TINY)
    store = AttributionStore.open_or_create(tmp_path / "s.zarr", request.spec(load_dataset(request.dataset)), 12)
    for block in store.missing_blocks():
        train_block(store, request, block, threads=1)
    monkeypatch.chdir(tmp_path)
    config = FitConfig(holdout_models=3, path_length=2, tol=1e-2, max_iter=20, targets_per_chunk=32,
                       val_fraction=0.3)
    report = fit_store("s.zarr", config, address=ray_session)
    assert report["chunks_fitted"] == 2
    assert AttributionStore.open(tmp_path / "s.zarr").fit_group("datamodels").is_complete()


def sub_commands() -> set[str]:
    """The names every command module registers (through argparse's public API)."""
    names = set()

    class Recorder:
        def add_parser(self, name, **kwargs):
            names.add(name)
            return argparse.ArgumentParser(prog=name)

    for module in COMMAND_MODULES:
        module.register(Recorder())
    return names


def test_every_dmm_command_named_in_the_code_exists():
    named = {}
    for path in sorted(p for d in ("attribution", "cluster", "matching") for p in (ROOT / d).rglob("*.py")):
        for match in re.finditer(r"`dmm ([a-z][a-z0-9-]*)", path.read_text()):
            named.setdefault(match.group(1), []).append(str(path.relative_to(ROOT)))
    assert {"estimate", "fit", "unlearn"} <= set(named)  # the scan finds what is there
    missing = {name: where for name, where in named.items() if name not in sub_commands()}
    assert not missing, f"messages name sub-commands that do not exist: {missing}"
