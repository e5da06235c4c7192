"""The write phase of a request, all or nothing: store keys and the output model change together.

`all_or_nothing(store, prefixes, out, state, meta)` first writes the output model and its sidecar
into a staging folder beside `out` (nothing visible yet) and snapshots every key under `prefixes`
of the store (θ0's logits, the ledger: a few MB at most). The caller's block then writes the
store; last, the model is moved into place (sidecar, then the model file: the commit point). If
anything raises, the store's keys under `prefixes` are put back byte for byte (keys the block
added are deleted), a replaced sidecar gets its old bytes back, and the staging folder (and any
folder made for `out`) is removed: store, ledger and model files are as they were.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from attribution.checkpoint import file_sha256, save_model, sidecar_path
from attribution.store import AttributionStore

IN_FLIGHT_TIMEOUT_S = 60.0  # longest wait for writes still in flight when a write failed


@contextlib.contextmanager
def all_or_nothing(store: AttributionStore, prefixes: list[str], out: Path, state: dict, meta: dict):
    """Stage the model for `out` and yield its sha256; the block writes the store; then publish the model."""
    made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = staging / out.name
        save_model(staged, state, meta)
        snapshot = _snapshot(store.group.store, prefixes)
        try:
            yield file_sha256(staged)
            _publish(staged, out)
        except BaseException:
            _restore(store.group.store, prefixes, snapshot)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for d in made:  # deepest first
            d.rmdir()
        raise
    shutil.rmtree(staging)


def _publish(staged: Path, out: Path) -> None:
    """Move the staged sidecar, then the staged model, over `out` (a failure restores the old sidecar)."""
    side = sidecar_path(out)
    old_side = side.read_bytes() if side.exists() else None
    os.replace(sidecar_path(staged), side)
    try:
        os.replace(staged, out)
    except BaseException:
        if old_side is None:
            side.unlink()
        else:
            side.write_bytes(old_side)
        raise


def _snapshot(zstore, prefixes: list[str]) -> dict[str, bytes]:
    """Every key under `prefixes` with its bytes."""
    async def grab():
        keys = [k for p in prefixes for k in await _keys(zstore, p)]
        return {k: (await zstore.get(k, prototype=default_buffer_prototype())).to_bytes() for k in keys}
    return sync(grab())


def _restore(zstore, prefixes: list[str], snapshot: dict[str, bytes]) -> None:
    """Make the keys under `prefixes` exactly `snapshot` again.

    Zarr writes an operation's keys concurrently and one failed write leaves its siblings running:
    wait for every other task on zarr's event loop first, so that none lands after the restore.
    """
    async def put_back():
        in_flight = asyncio.all_tasks() - {asyncio.current_task()}
        if in_flight:
            await asyncio.wait(in_flight, timeout=IN_FLIGHT_TIMEOUT_S)
        for p in prefixes:
            if not any(k.startswith(p + "/") for k in snapshot):
                await zstore.delete_dir(p)
                continue
            for k in await _keys(zstore, p):
                if k not in snapshot:
                    await zstore.delete(k)
        buffer = default_buffer_prototype().buffer
        for k, value in snapshot.items():
            await zstore.set(k, buffer.from_bytes(value))
    sync(put_back())


async def _keys(zstore, prefix: str) -> list[str]:
    return [k async for k in zstore.list_prefix(prefix + "/")]
