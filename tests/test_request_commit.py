"""A failed request changes nothing (matching/request.py, matching/commit.py).

A failure is injected at every write a request makes, one run per write: every store write (a key
set or deleted through zarr's LocalStore), every file rename, and each named write function. After
each, the store (its ledger and θ0's logits included) and every model file are byte-identical and
no staging file is left; the run after the last write succeeds.
"""
from __future__ import annotations

import inspect
import itertools
import os
import shutil
from pathlib import Path

import pytest
from zarr.storage import LocalStore

import attribution.checkpoint
import matching.commit
import matching.request
from attribution.store import AttributionStore
from fixtures_store import copy_store, digits_store, train_and_save, tree_hashes
from matching.finetune import MatchingConfig
from matching.ledger import read_ledger
from matching.request import unlearn_request

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHEAP = MatchingConfig(min_steps=1, max_steps=1)


class Injected(OSError):
    """The injected failure (an I/O error, as a full disk or a dropped connection would raise)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """θ0, a store without requests ("first") and one after request 1 with its output u1 ("later")."""
    fixture = digits_store(tmp_path_factory.getbasetemp() / "digits-store")
    base = tmp_path_factory.mktemp("commit")
    (theta0,) = train_and_save(fixture, [base / "models" / "theta0.safetensors"], [0])
    later = copy_store(fixture, base / "later.zarr")
    unlearn_request(later, theta0, [0, 1, 2], out=base / "models" / "u1.safetensors", config=CHEAP)
    return {"fixture": fixture, "models": base / "models", "first": (None, theta0),
            "later": (later, base / "models" / "u1.safetensors")}


def prepare(world, root: Path, which: str) -> tuple[str, Path, Path]:
    """(store copy, input model, output path) under root: a first request writes into a folder it makes,
    a later one over an existing output file and sidecar (whose old bytes must survive a failure)."""
    template, model = world[which]
    store = str(shutil.copytree(template or world["fixture"].url, root / "s.zarr"))
    (root / "out").mkdir()
    if which == "first":
        return store, model, root / "out" / "new" / "u.safetensors"
    out = root / "out" / "u.safetensors"
    out.write_bytes(b"an older model")
    Path(str(out) + ".json").write_text('{"older": true}')
    return store, model, out


def snapshot(world, store: str, root: Path) -> tuple[dict, list[str]]:
    """Hashes of every file of the store and of every model file, and the names in the output folder."""
    return tree_hashes(store, world["models"], root / "out"), sorted(p.name for p in (root / "out").iterdir())


def fail_at(m, owner, names: tuple[str, ...], n: int, calls: list[int]) -> None:
    """Patch owner.<name> for each name so that the n-th call among all of them raises `Injected`."""
    for name in names:
        real = getattr(owner, name)

        def tick(name=name):
            calls[0] += 1
            if calls[0] == n:
                raise Injected(f"injected failure at write {n} ({name})")

        if inspect.iscoroutinefunction(real):
            async def wrapper(*a, _real=real, _tick=tick, **k):
                _tick()
                return await _real(*a, **k)
        else:
            def wrapper(*a, _real=real, _tick=tick, **k):
                _tick()
                return _real(*a, **k)
        m.setattr(owner, name, wrapper)


WRITES = {
    "store write": (LocalStore, ("_set", "delete", "delete_dir")),  # every key zarr sets or deletes
    "file rename": (os, ("replace",)),  # save_model's atomic writes and moving the model into place
}


@pytest.mark.parametrize("which", ["first", "later"])
@pytest.mark.parametrize("kind", list(WRITES))
def test_a_failure_at_any_write_changes_nothing(world, tmp_path, monkeypatch, which, kind):
    owner, names = WRITES[kind]
    store, model, out = prepare(world, tmp_path, which)
    before = snapshot(world, store, tmp_path)
    for n in itertools.count(1):  # the same store every time: failed requests must not add up either
        calls = [0]
        with monkeypatch.context() as m:
            fail_at(m, owner, names, n, calls)
            try:
                result = unlearn_request(store, model, [10, 11, 12], out=out, config=CHEAP)
            except Injected:
                assert snapshot(world, store, tmp_path) == before, f"a failure at {kind} {n} left a change"
                continue
        assert calls[0] < n  # the first run that reached no injected failure: every write was tried
        break
    assert n > 2, f"only {n - 1} {kind}s were tested"
    assert result.entry.output_sha256 == attribution.checkpoint.file_sha256(out)
    assert read_ledger(AttributionStore.open(store))[-1] == result.entry


@pytest.mark.parametrize("owner,name", [(AttributionStore, "write_original_logits"),
                                        (matching.request, "append_entry"),
                                        (matching.commit, "save_model"),
                                        (attribution.checkpoint, "save_file")])
def test_a_failing_write_function_changes_nothing(world, tmp_path, monkeypatch, owner, name):
    store, model, out = prepare(world, tmp_path, "first")
    before = snapshot(world, store, tmp_path)
    fail_at(monkeypatch, owner, (name,), 1, [0])
    with pytest.raises(Injected):
        unlearn_request(store, model, [10, 11, 12], out=out, config=CHEAP)
    assert snapshot(world, store, tmp_path) == before
