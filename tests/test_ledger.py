"""The ledger's writers on fsspec stores (matching/ledger.py, matching/lease.py): two concurrent
requests never lose an entry; the lease is exclusive even where exclusive create is not atomic,
survives while renewed, is taken over once abandoned, refuses a holder that lost it, and times out
on one line."""
from __future__ import annotations

import re
import threading
import time
import uuid

import fsspec
import pytest

from attribution.checkpoint import file_sha256
from attribution.store import AttributionStore
from fixtures_store import digits_store, train_and_save
from matching import lease as lease_module
from matching.errors import MatchingError
from matching.finetune import MatchingConfig
from matching.lease import Lease
from matching.ledger import read_ledger, store_lock
from matching.request import unlearn_request

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def quick(monkeypatch):
    """Short lease timings (seconds) so that waits in these tests stay short."""
    for name, value in (("SETTLE_S", 0.05), ("STALE_S", 1.0), ("POLL_S", 0.01)):
        monkeypatch.setattr(lease_module, name, value)


def memory_url() -> str:
    return f"memory://dmm-test-{uuid.uuid4().hex}/s.zarr"


def lease_bytes(url: str) -> bytes | None:
    fs, path = fsspec.core.url_to_fs(url + ".lock")
    return fs.cat_file(path) if fs.exists(path) else None


# --------------------------------------------------------------------------- requests


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    fixture = digits_store(tmp_path_factory.getbasetemp() / "digits-store")
    models = tmp_path_factory.mktemp("ledger-models")
    (theta0,) = train_and_save(fixture, [models / "theta0.safetensors"], [0])
    return {"fixture": fixture, "theta0": theta0}


def fsspec_copy(world, scheme: str, tmp_path) -> str:
    """The digits store copied to a `memory://` or `file://` URL, written through fsspec."""
    url = memory_url() if scheme == "memory" else f"file://{tmp_path}/s.zarr"
    fs, path = fsspec.core.url_to_fs(url)
    fs.put(world["fixture"].url + "/", path, recursive=True)
    return url


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_two_concurrent_requests_on_an_fsspec_store_lose_no_entry(world, tmp_path, scheme):
    url = fsspec_copy(world, scheme, tmp_path)
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    results = [None, None]

    def request(i: int, ids: list[int]) -> None:
        try:
            results[i] = unlearn_request(url, world["theta0"], ids, out=outs[i], config=MatchingConfig(min_steps=1, max_steps=1))
        except MatchingError as e:
            results[i] = e

    threads = [threading.Thread(target=request, args=(i, ids)) for i, ids in enumerate(([1, 2, 3], [4, 5, 6]))]
    with store_lock(AttributionStore.open(url), timeout=5):  # both requests wait for the store together
        for t in threads:
            t.start()
        time.sleep(1)
    for t in threads:
        t.join(timeout=300)
    done = [r for r in results if not isinstance(r, MatchingError)]
    refused = [r for r in results if isinstance(r, MatchingError)]
    assert len(done) == len(refused) == 1, results  # both writing request 1 would lose one entry
    assert "not the latest" in str(refused[0]) and "\n" not in str(refused[0])
    (entry,) = read_ledger(AttributionStore.open(url))
    assert entry == done[0].entry and entry.output_sha256 == file_sha256(entry.output_path)
    assert [o.exists() for o in outs].count(True) == 1 and lease_bytes(url) is None


# --------------------------------------------------------------------------- the lease


def test_a_held_lease_times_out_on_one_line_and_is_left_alone(quick):
    url = memory_url()
    holder = Lease(url)
    holder.acquire(timeout=1)
    held = lease_bytes(url)
    try:
        with pytest.raises(MatchingError, match=re.escape(f"store {url} is busy with another request (held by pid")):
            Lease(url).acquire(timeout=2.5)  # over two stale periods: the renewed lease is not taken over
        assert lease_bytes(url) != held  # renewed meanwhile
        holder.check()
    finally:
        holder.release()
    assert lease_bytes(url) is None


def test_an_abandoned_lease_is_taken_over_and_its_holder_refuses_to_write(quick):
    url = memory_url()
    crashed = Lease(url)
    crashed.acquire(timeout=1)
    crashed._stop.set()  # the holder's process froze: no more renewals
    crashed._beat_thread.join()
    started = time.monotonic()
    successor = Lease(url)
    successor.acquire(timeout=10)
    assert time.monotonic() - started >= lease_module.STALE_S
    with pytest.raises(MatchingError, match="lost the lease .* nothing was written"):
        crashed.check()
    crashed.release()  # deletes nothing: the lease is the successor's
    successor.check()
    successor.release()
    assert lease_bytes(url) is None


def test_the_lease_is_exclusive_where_exclusive_create_is_not_atomic(quick, monkeypatch):
    """A filesystem whose "xb" checks for the object, then writes it a little later: writers that all
    passed the check overwrite each other, and the read-back after SETTLE_S lets one in at a time."""
    url = memory_url()
    fs, _ = fsspec.core.url_to_fs(url)
    real_open = type(fs).open

    def racy_open(self, path, mode="rb", **kw):
        if mode != "xb":
            return real_open(self, path, mode, **kw)
        if self.exists(path):
            raise FileExistsError(path)
        time.sleep(lease_module.SETTLE_S / 2)  # the race window, shorter than the settle time
        return real_open(self, path, "wb", **kw)

    monkeypatch.setattr(type(fs), "open", racy_open)
    inside, most, lock = [0], [0], threading.Lock()
    start = threading.Barrier(4)

    def worker():
        lease = Lease(url)
        start.wait()
        lease.acquire(timeout=30)
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.1)
        lease.check()
        with lock:
            inside[0] -= 1
        lease.release()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert most[0] == 1 and inside[0] == 0
