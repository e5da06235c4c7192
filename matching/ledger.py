"""The append-only ledger of deletion requests, kept inside the store (DESIGN.md §4).

`ledger/entries` is a Zarr string array with one chunk per request, each a JSON object
(`LedgerEntry`). Appending writes one new chunk and grows the shape; earlier chunks are never
rewritten. A slot left empty by an interrupted append is reused by the next one.

Writers serialise with `store_lock`, on every store: a file lock beside a store on a local path
(`<store>.lock`, released by the OS if its holder dies), a lease object beside a store on an fsspec
URL (`<store>.lock`, see `lease.py`). A request waits for the store up to its timeout, then is
refused with a one-line error; no request's entry can overwrite another's.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

import numpy as np
from filelock import FileLock, Timeout

from attribution.store import AttributionStore
from attribution.store_zarr import COMPRESSORS, array_attrs, get_array, has_scheme

from .errors import MatchingError
from .lease import Lease, busy_error

LEDGER = "ledger/entries"


@dataclass(frozen=True)
class LedgerEntry:
    """One request: which ids F it forgot, with what, from which model file into which."""
    id: int                 # 1, 2, ... in request order
    time_utc: str           # ISO 8601 UTC time at which the request was recorded
    method: str             # "dmm", "om", ...
    attribution: str        # fit group the targets came from ("datamodels" | "trak")
    n_ids: int              # |ids of this request|
    ids_sha256: str         # sha256 of this request's sorted int64 ids
    ids: list[int]          # this request's ids; the union over the ledger is everything forgotten
    n_forgotten: int        # |union of all ids forgotten so far|, this request included
    input_sha256: str       # model file the request started from (θ0 for request 1)
    output_sha256: str      # model file it wrote
    output_path: str
    seed: int               # drew the retain sample R and the minibatch order
    config: dict            # the full matching config
    wall_s: float           # wall time of the request
    stats: dict = field(default_factory=dict)  # the method's report (DMM: loss_start, loss_end, steps, …);
                                               # absent from entries written before it existed

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def ids_sha256(ids: np.ndarray) -> str:
    """sha256 of the sorted ids as little-endian int64 bytes."""
    return hashlib.sha256(np.sort(np.asarray(ids, dtype="<i8")).tobytes()).hexdigest()


def _parse(text: str, position: int, url: str) -> LedgerEntry:
    try:
        raw = json.loads(text)
        optional = {"stats"}
        return LedgerEntry(**{f.name: raw[f.name] for f in fields(LedgerEntry) if f.name in raw or f.name not in optional})
    except (ValueError, KeyError, TypeError):
        raise MatchingError(f"ledger entry {position + 1} in {url} is malformed; restore the store from a copy") from None


def read_ledger(store: AttributionStore) -> list[LedgerEntry]:
    """All recorded requests, oldest first (a trailing slot of an interrupted append is skipped)."""
    arr = get_array(store.group, LEDGER)
    if arr is None:
        return []
    texts = [str(t) for t in arr[:]]
    while texts and not texts[-1]:
        texts.pop()
    return [_parse(t, i, store.url) for i, t in enumerate(texts)]


def append_entry(store: AttributionStore, entry: LedgerEntry) -> None:
    """Write `entry` into slot entry.id − 1 (under `store_lock`, with id = len(read_ledger(store)) + 1)."""
    slot = entry.id - 1
    arr = get_array(store.group, LEDGER)
    if arr is not None:
        if arr.shape[0] <= slot:
            arr.resize((slot + 1,))
    else:  # created with the first entry's slot (one metadata write fewer than creating it empty and growing it)
        arr = store.group.create_array(
            LEDGER, shape=(slot + 1,), chunks=(1,), dtype=str, fill_value="", compressors=COMPRESSORS,
            attributes=array_attrs(store.fingerprint, "deletion requests, one JSON object per chunk, append-only"),
        )
    arr[slot:slot + 1] = np.array([entry.to_json()], dtype=object)


def forgotten_ids(entries: list[LedgerEntry]) -> np.ndarray:
    """The union of every id forgotten so far (sorted int64)."""
    if not entries:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in entries]))


@contextlib.contextmanager
def store_lock(store: AttributionStore, timeout: float):
    """Exclusive right to record a request in `store`, waited for `timeout` seconds at most.

    Yields `still_held()`: call it right before writing; it raises if a lease was lost meanwhile.
    """
    if has_scheme(store.url):
        lease = Lease(store.url)
        lease.acquire(timeout)
        try:
            yield lease.check
        finally:
            lease.release()
        return
    lock = FileLock(store.url + ".lock")
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise busy_error(store.url, timeout) from None
    try:
        yield lambda: None
    finally:
        lock.release()


def _stat(entry: LedgerEntry, key: str) -> str:
    value = entry.stats.get(key)
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def format_ledger(entries: list[LedgerEntry]) -> str:
    """The history as a table, one request per line."""
    if not entries:
        return "no deletion requests recorded"
    head = f"{'id':>3}  {'time (UTC)':<25} {'method':<6} {'attr':<10} {'ids':>6} {'total':>6}  " \
           f"{'ids sha256':<12}  {'input':<12}  {'output':<12} {'wall s':>7} {'loss start':>10} {'loss end':>10} " \
           f"{'steps':>6} {'spread':>6}  output path"
    rows = [f"{e.id:>3}  {e.time_utc:<25} {e.method:<6} {e.attribution:<10} {e.n_ids:>6} {e.n_forgotten:>6}  "
            f"{e.ids_sha256[:12]}  {e.input_sha256[:12]}  {e.output_sha256[:12]} {e.wall_s:>7.2f} "
            f"{_stat(e, 'loss_start'):>10} {_stat(e, 'loss_end'):>10} {_stat(e, 'steps'):>6} {_stat(e, 'spread'):>6}  "
            f"{e.output_path}"
            for e in entries]
    return "\n".join([head, *rows])
