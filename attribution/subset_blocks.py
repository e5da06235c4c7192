"""The subset models' half of the store (DESIGN.md §4): ``subsets/masks``, ``subsets/logits``, ``subsets/done``.

Row j of ``masks`` is the 0/1 mask of S_j (model j's training subset) and row j of ``logits`` its
logits f(x; S_j) on every target x (train points then held-out points); the m rows come in blocks
of ``block_size`` models, each exactly one stored object of both arrays, written by one worker, and
the block's marker (its own one-element chunk of ``done``) is set only *after* the data: readers see
only marked blocks.

``logits`` is sharded (Zarr v3 ``sharding_indexed``, :func:`logits_layout`): one shard per block
(block_size × all targets, so one writer per object) holding inner chunks of block_size × T targets,
T = attr ``target_chunk`` (the fit's default target chunk). A fit task reading targets [a, b) fetches
each block's shard index and the inner chunks overlapping [a, b) by byte range, not the whole block.
Stores written before sharding (one chunk block_size × p × k) are read and grown as they are: Zarr
takes the layout from each array's metadata.

:class:`SubsetBlocks` is a mixin of :class:`~attribution.store.AttributionStore`: it needs the
store's ``url``, ``spec``, ``num_models``, ``_group`` and ``_require_writable``. The three arrays
are opened (and checked against the root's fingerprint and shapes) on first use, so a handle that
never touches them — a deletion request — never pays for them.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import zarr

from .store_spec import SCHEMA_VERSION, StoreError, StoreSpec
from .store_zarr import ARRAY_CONFIG, COMPRESSORS, array_attrs, get_array

MASKS = "subsets/masks"
LOGITS = "subsets/logits"
DONE = "subsets/done"
# The fit's default target chunk (cluster.fit.FitConfig.targets_per_chunk, TrakSettings.target_chunk):
# the inner chunk of ``logits`` along targets. A fit with another chunk reads the inner chunks it overlaps.
LOGITS_TARGET_CHUNK = 256


def _runs(blocks: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted block ids -> [start, stop) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


def check_num_models(num_models: int) -> int:
    if isinstance(num_models, bool) or not isinstance(num_models, (int, np.integer)) or num_models < 1:
        raise StoreError(f"num_models must be a positive int, got {num_models!r}; fix: pass --num-models N >= 1")
    return int(num_models)


def shrink_message(url: str, want: int, have: int) -> str:
    return (
        f"store {url} already holds a request for {have} models and shrinking to {want} is refused; "
        f"fix: pass --num-models >= {have} or use a new --store path"
    )


def logits_layout(spec: StoreSpec) -> dict:
    """``chunks`` (inner: block_size × T × k) and ``shards`` (block_size × ⌈p / T⌉·T × k: one block, every
    target) of ``subsets/logits``, T = min(LOGITS_TARGET_CHUNK, p)."""
    t = min(LOGITS_TARGET_CHUNK, spec.n_points)
    bs, k = spec.block_size, spec.num_classes
    return {"chunks": (bs, t, k), "shards": (bs, math.ceil(spec.n_points / t) * t, k)}


def ensure_subset_layout(group: zarr.Group, spec: StoreSpec, num_models: int) -> None:
    """Driver: create whichever subset arrays are missing (idempotent; repairs an interrupted creation)."""
    bs = spec.block_size
    nb = math.ceil(num_models / bs)
    m = nb * bs
    logits = logits_layout(spec)
    shapes = {
        MASKS: ((m, spec.n_train), {"chunks": (bs, spec.n_train)}, "bool", False,
                "row j: training points used by subset model j", {}),
        LOGITS: ((m, spec.n_points, spec.num_classes), logits, "float32", 0.0,
                 "logits of subset model j on train then held-out points", {"target_chunk": logits["chunks"][1]}),
        DONE: ((nb,), {"chunks": (1,)}, "bool", False, "block completion markers (set after data)", {}),
    }
    for path, (shape, layout, dtype, fill, meaning, extra) in shapes.items():
        if get_array(group, path) is None:
            group.create_array(
                path, shape=shape, **layout, dtype=dtype, fill_value=fill,
                compressors=COMPRESSORS, attributes=array_attrs(spec.fingerprint, meaning, **extra),
                config=ARRAY_CONFIG,
            )


def write_unit(arr: zarr.Array) -> tuple[int, ...]:
    """The shape of one stored object of ``arr``: its shard if sharded, else its chunk."""
    return arr.shards or arr.chunks


def open_subset_arrays(group: zarr.Group, url: str, spec: StoreSpec) -> tuple[zarr.Array, zarr.Array, zarr.Array]:
    """(masks, logits, done), each checked against the root's fingerprint, schema and shapes."""
    arrays = {p: get_array(group, p) for p in (MASKS, LOGITS, DONE)}
    missing = [p for p, a in arrays.items() if a is None]
    if missing:
        raise StoreError(f"store {url} is incomplete (missing {missing}); fix: rerun `dmm estimate`, which repairs it")
    for path, arr in arrays.items():
        a = dict(arr.attrs)
        if a.get("fingerprint") != spec.fingerprint or a.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"array {path} in {url} carries fingerprint/schema {a.get('fingerprint')!r}/"
                f"{a.get('schema_version')!r}, root says {spec.fingerprint!r}/{SCHEMA_VERSION}; fix: rebuild the store"
            )
    masks, logits, done = arrays[MASKS], arrays[LOGITS], arrays[DONE]
    bs = spec.block_size
    # a block must be exactly one stored object of each array (one writer per object), in either logits layout
    one_object = all(write_unit(a)[0] == bs and all(u >= d for u, d in zip(write_unit(a)[1:], a.shape[1:]))
                     for a in (masks, logits))
    if not (masks.shape[1:] == (spec.n_train,) and logits.shape[1:] == (spec.n_points, spec.num_classes) and one_object):
        raise StoreError(f"store {url} has subset arrays whose shape or chunking disagrees with its attributes "
                         "(a block must be one chunk or shard of each); fix: rebuild the store")
    return masks, logits, done


class SubsetBlocks:
    """Blocks of subset models: capacity, markers, writes and consistent reads (a store mixin)."""

    _subsets: tuple[zarr.Array, zarr.Array, zarr.Array] | None = None

    def _subset_arrays(self) -> tuple[zarr.Array, zarr.Array, zarr.Array]:
        if self._subsets is None:
            self._subsets = open_subset_arrays(self._group, self.url, self.spec)
        return self._subsets

    @property
    def num_blocks(self) -> int:
        """Blocks whose rows exist in every subset array (interrupted growth counts the smallest)."""
        masks, logits, done = self._subset_arrays()
        bs = self.block_size
        return min(done.shape[0], masks.shape[0] // bs, logits.shape[0] // bs)

    @property
    def allocated_models(self) -> int:
        return self.num_blocks * self.block_size

    def ensure_capacity(self, num_models: int) -> None:
        """Grow the subset arrays to hold ``num_models`` (rounded up to whole blocks). Never shrinks."""
        num_models = check_num_models(num_models)
        if num_models < self.num_models:
            raise StoreError(shrink_message(self.url, num_models, self.num_models))
        nb = math.ceil(num_models / self.block_size)
        if nb > self.num_blocks or num_models != self.num_models:
            self._require_writable()
        m = nb * self.block_size
        masks, logits, done = self._subset_arrays()
        # data arrays first, markers after, requested count last: a crash leaves num_blocks
        # (the min over arrays) consistent, and rerunning repairs.
        if masks.shape[0] < m:
            masks.resize((m,) + masks.shape[1:])
        if logits.shape[0] < m:
            logits.resize((m,) + logits.shape[1:])
        if done.shape[0] < nb:
            done.resize((nb,))
        if num_models != self.num_models:
            self._group.attrs.update({"num_models_requested": num_models})
            self.attrs = dict(self._group.attrs)

    def _check_block(self, block: int) -> int:
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 0 <= block < self.num_blocks:
            raise StoreError(
                f"block {block!r} out of range [0, {self.num_blocks}) in {self.url}; "
                "fix: call ensure_capacity()/refresh() or use a block from missing_blocks()"
            )
        return int(block)

    def block_rows(self, block: int) -> slice:
        """Rows of the subset arrays that belong to ``block``."""
        b = self._check_block(block)
        return slice(b * self.block_size, (b + 1) * self.block_size)

    def block_done(self, block: int) -> bool:
        b = self._check_block(block)
        return bool(self._subset_arrays()[2][b])

    def completed_blocks(self) -> list[int]:
        """Blocks whose marker is set (read fresh from the store each call)."""
        nb = self.num_blocks
        if nb == 0:
            return []
        done = np.asarray(self._subset_arrays()[2][:nb], dtype=bool)
        return [int(i) for i in np.flatnonzero(done)]

    def missing_blocks(self) -> list[int]:
        done = set(self.completed_blocks())
        return [b for b in range(self.num_blocks) if b not in done]

    def completed_models(self) -> int:
        return len(self.completed_blocks()) * self.block_size

    def write_block(self, block: int, masks: np.ndarray, logits: np.ndarray) -> None:
        """Write block ``block``'s masks and logits (exactly its own chunk / shard), then set its marker."""
        self._require_writable()
        rows = self.block_rows(block)
        s, bs = self.spec, self.block_size
        masks = np.asarray(masks)
        if masks.shape != (bs, s.n_train):
            raise StoreError(f"block {block} masks have shape {masks.shape}, store expects {(bs, s.n_train)}; fix: train block_size models per block")
        if masks.dtype != np.bool_:
            if not np.isin(masks, (0, 1)).all():
                raise StoreError(f"block {block} masks are not 0/1; fix: pass boolean subset masks")
            masks = masks.astype(bool)
        logits = np.asarray(logits)
        if logits.shape != (bs, s.n_points, s.num_classes):
            raise StoreError(
                f"block {block} logits have shape {logits.shape}, store expects {(bs, s.n_points, s.num_classes)}; "
                "fix: evaluate every model on train then held-out points"
            )
        logits = logits.astype(np.float32, copy=False)
        if not np.isfinite(logits).all():
            raise StoreError(f"block {block} logits contain NaN/inf; fix: rerun the block (training diverged?)")
        masks_arr, logits_arr, done = self._subset_arrays()
        masks_arr[rows] = masks
        logits_arr[rows] = logits
        done[block : block + 1] = np.ones(1, dtype=bool)  # marker last

    def _resolve_blocks(self, blocks: Iterable[int] | None) -> list[int]:
        if blocks is None:
            return self.completed_blocks()
        blocks = sorted({self._check_block(b) for b in blocks})
        done = set(self.completed_blocks())
        not_done = [b for b in blocks if b not in done]
        if not_done:
            raise StoreError(f"blocks {not_done} of {self.url} are not complete; fix: read completed_blocks() only")
        return blocks

    def _read_rows(self, arr: zarr.Array, blocks: list[int], tail: tuple) -> np.ndarray:
        bs = self.block_size
        runs = _runs(blocks) or [(0, 0)]  # no blocks: a (0, ...) array of the right shape
        parts = [np.asarray(arr[(slice(a * bs, b * bs),) + tail]) for a, b in runs]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def read_masks(self, blocks: Iterable[int] | None = None) -> np.ndarray:
        """Masks of completed blocks (all completed if ``blocks`` is None), in block order.

        Read masks and logits with the same explicit ``blocks`` list (e.g. from
        ``completed_blocks()`` or :meth:`read`) so rows stay aligned while writers run.
        """
        return self._read_rows(self._subset_arrays()[0], self._resolve_blocks(blocks), ())

    def read_logits(self, blocks: Iterable[int] | None = None, targets: slice | None = None) -> np.ndarray:
        """Logits (rows × targets × k) of completed blocks; ``targets`` slices the point axis (reading, in a
        sharded store, only the inner chunks it overlaps)."""
        tail = () if targets is None else (targets,)
        return self._read_rows(self._subset_arrays()[1], self._resolve_blocks(blocks), tail)

    def read(self, blocks: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """A consistent snapshot: (masks, logits, blocks) of the completed blocks."""
        blocks = self._resolve_blocks(blocks)
        return self.read_masks(blocks), self.read_logits(blocks), blocks
