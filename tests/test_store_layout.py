"""The sharded ``subsets/logits`` layout (attribution/subset_blocks.py): a fit task reads only its share.

A shard is one block × every target (one writer per object); its inner chunks are one block × T targets
(T = attr ``target_chunk``, the fit's default 256). A read of targets [a, b) must fetch only the shard
indexes and the inner chunks overlapping [a, b): the tests count the bytes the store hands out
(``CountingStore`` wraps a LocalStore or an fsspec MemoryStore) and compare them with the *stored*
(compressed) bytes of those inner chunks, taken from each shard's own index, plus the stored bytes of
the masks. A store written before sharding (one chunk per block) is still read and grown as it is.
"""
from __future__ import annotations

import hashlib
import math
import uuid
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from attribution.store import AttributionStore, StoreError, StoreSpec
from attribution.store_zarr import COMPRESSORS, ARRAY_CONFIG, array_attrs, make_store
from attribution.subset_blocks import LOGITS, LOGITS_TARGET_CHUNK, MASKS
from fixtures_store import tree_hashes

# p = 700 targets: inner chunks [0, 256), [256, 512), [512, 700) (the last one partial); shard = 768 targets
N_TRAIN, N_POINTS, K, BS, BLOCKS = 40, 700, 10, 4, 3
SLICES = [slice(0, 256), slice(256, 512), slice(200, 300), slice(255, 257), slice(512, 700), slice(600, 700),
          slice(699, 700), slice(0, 700), slice(100, 650), slice(300, 300)]


class CountingStore(WrapperStore):
    """Passes every call to the wrapped store and records (key, bytes returned) of each read."""

    def __init__(self, store) -> None:
        super().__init__(store)
        self.reads: list[tuple[str, int]] = []

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        self.reads.append((key, 0 if buf is None else len(buf)))
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        self.reads += [(key, 0 if b is None else len(b)) for (key, _), b in zip(key_ranges, bufs)]
        return bufs

    async def _get_many(self, requests):
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)


def make_spec(n_points: int = N_POINTS) -> StoreSpec:
    return StoreSpec(dataset="digits", fingerprint=hashlib.sha256(b"digits").hexdigest(), model="mlp",
                     recipe={"epochs": 1}, alpha=0.5, seed=0, block_size=BS, n_train=N_TRAIN,
                     n_points=n_points, num_classes=K)


def block_data(block: int, n_points: int = N_POINTS):
    rng = np.random.default_rng(100 + block)
    return rng.random((BS, N_TRAIN)) < 0.5, rng.standard_normal((BS, n_points, K)).astype(np.float32)


def write_old_layout(url: str, spec: StoreSpec) -> None:
    """Replace ``subsets/logits`` with the layout written before sharding: one chunk block_size × p × k."""
    group = zarr.open_group(make_store(url, read_only=False), mode="r+", zarr_format=3)
    shape = group[LOGITS].shape
    group.create_array(LOGITS, shape=shape, chunks=(BS,) + shape[1:], dtype="float32", fill_value=0.0,
                       compressors=COMPRESSORS, config=ARRAY_CONFIG, overwrite=True,
                       attributes=array_attrs(spec.fingerprint, "logits of subset model j on train then held-out points"))


def build(url: str, old_layout: bool = False, n_points: int = N_POINTS) -> AttributionStore:
    spec = make_spec(n_points)
    AttributionStore.open_or_create(url, spec, num_models=BS * BLOCKS)
    if old_layout:
        write_old_layout(url, spec)
    st = AttributionStore.open(url, "r+")
    for b in range(BLOCKS):
        st.write_block(b, *block_data(b, n_points))
    return st


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path):
    return str(tmp_path / "s") if request.param == "local" else f"memory://dmm-layout-{uuid.uuid4().hex}"


def expected_logits(blocks) -> np.ndarray:
    return np.concatenate([block_data(b)[1] for b in blocks])


def stored(url: str, key: str) -> bytes:
    buf = sync(make_store(url, read_only=True).get(key, prototype=default_buffer_prototype()))
    return buf.to_bytes()


def inner_chunk_bytes(url: str, block: int, targets: slice) -> int:
    """Stored bytes of the inner chunks of ``block``'s shard that overlap ``targets``, from the shard's index
    (the spec's footer: (offset, nbytes) little-endian uint64 pairs in C order, then a crc32c)."""
    shard = stored(url, f"{LOGITS}/c/{block}/0/0")
    n_inner = math.ceil(N_POINTS / LOGITS_TARGET_CHUNK)
    index = np.frombuffer(shard[-(16 * n_inner + 4):-4], dtype="<u8").reshape(n_inner, 2)
    # the parse is right: the chunks tile the shard's bytes before the index
    assert sorted(index[:, 0]) == [0, *np.cumsum(index[np.argsort(index[:, 0]), 1])[:-1]]
    assert int(index[:, 1].sum()) == len(shard) - (16 * n_inner + 4)
    first, last = targets.start // LOGITS_TARGET_CHUNK, (targets.stop - 1) // LOGITS_TARGET_CHUNK
    return int(index[first:last + 1, 1].sum())


def counted_handle(url: str) -> tuple[AttributionStore, CountingStore]:
    counting = CountingStore(make_store(url, read_only=True))
    st = AttributionStore(url, zarr.open_group(counting, mode="r", zarr_format=3), "r")
    st.completed_blocks()  # open the subset arrays (metadata) before counting
    counting.reads.clear()
    return st, counting


# --------------------------------------------------------------------------- layout


def test_a_block_is_one_shard_of_inner_target_chunks(tmp_path):
    st = build(str(tmp_path / "s"))
    arr = st.zarr_array(LOGITS)
    assert arr.chunks == (BS, 256, K) and arr.shards == (BS, 768, K)
    assert arr.attrs["target_chunk"] == LOGITS_TARGET_CHUNK == 256
    keys = sorted(str(p.relative_to(tmp_path / "s" / LOGITS / "c")) for p in (tmp_path / "s" / LOGITS / "c").rglob("*")
                  if p.is_file())
    assert keys == ["0/0/0", "1/0/0", "2/0/0"]  # one object per block: one writer each
    # fewer targets than the default chunk: one inner chunk of all targets
    small = AttributionStore.open_or_create(str(tmp_path / "t"), make_spec(n_points=N_TRAIN + 5), BS)
    assert small.zarr_array(LOGITS).chunks == small.zarr_array(LOGITS).shards == (BS, N_TRAIN + 5, K)
    assert small.zarr_array(LOGITS).attrs["target_chunk"] == N_TRAIN + 5


def test_target_chunk_is_the_fits_default():
    from attribution.trak import TrakSettings
    from cluster.fit import FitConfig

    assert LOGITS_TARGET_CHUNK == FitConfig.targets_per_chunk == TrakSettings.target_chunk


def test_sharded_logits_round_trip_every_target_slice(url):
    st = build(url)
    ro = AttributionStore.open(url)
    for blocks in ([0, 1, 2], [0, 2], [1]):
        want = expected_logits(blocks)
        np.testing.assert_array_equal(ro.read_logits(blocks), want)
        for sl in SLICES:
            got = ro.read_logits(blocks, targets=sl)
            assert got.dtype == np.float32 and got.shape == (4 * len(blocks), sl.stop - sl.start, K)
            np.testing.assert_array_equal(got, want[:, sl], err_msg=f"blocks {blocks} targets {sl}")
    np.testing.assert_array_equal(ro.read_masks(), np.concatenate([block_data(b)[0] for b in range(BLOCKS)]))
    assert st.read_logits([], targets=slice(10, 20)).shape == (0, 10, K)


def test_rewriting_a_block_writes_the_same_bytes(tmp_path):
    st = build(str(tmp_path / "a"))
    before = tree_hashes(tmp_path / "a")
    st.write_block(1, *block_data(1))
    assert tree_hashes(tmp_path / "a") == before
    other = build(str(tmp_path / "b"))  # another store, same data: the same shard bytes
    assert other.url != st.url
    for b in range(BLOCKS):
        key = f"{LOGITS}/c/{b}/0/0"
        assert (tmp_path / "a" / key).read_bytes() == (tmp_path / "b" / key).read_bytes()


# --------------------------------------------------------------------------- bytes a fit task reads


@pytest.mark.parametrize("targets", [slice(256, 512), slice(200, 300), slice(512, 700), slice(0, 256)])
def test_a_fit_task_reads_only_its_targets_and_the_masks(url, targets):
    """Stored bytes handed out by the store vs stored bytes of the overlapping inner chunks + masks (compressed
    vs compressed): read_logits, and the Dask-over-Zarr read `dmm fit` does today, both within 1.5×."""
    build(url)
    blocks = list(range(BLOCKS))
    logits_share = sum(inner_chunk_bytes(url, b, targets) for b in blocks)
    share = logits_share + sum(len(stored(url, f"{MASKS}/c/{b}/0")) for b in blocks)
    st, counting = counted_handle(url)
    masks = st.read_masks(blocks)
    logits = st.read_logits(blocks, targets=targets)
    read = sum(n for _, n in counting.reads)
    np.testing.assert_array_equal(logits, expected_logits(blocks)[:, targets])
    assert masks.shape == (BS * BLOCKS, N_TRAIN)
    assert {k.rsplit("/c/", 1)[0] for k, _ in counting.reads} <= {MASKS, LOGITS, "subsets/done"}
    assert read <= 1.5 * share, f"read {read} stored bytes for a share of {share}"

    counting.reads.clear()
    lazy = da.from_zarr(st.zarr_array(LOGITS), chunks=(BS, LOGITS_TARGET_CHUNK, K))[np.arange(BS * BLOCKS)]
    np.testing.assert_array_equal(lazy[:, targets].compute(scheduler="sync"), expected_logits(blocks)[:, targets])
    dask_read = sum(n for _, n in counting.reads)
    assert dask_read <= 1.5 * logits_share, f"read {dask_read} stored bytes for a share of {logits_share}"


def test_the_byte_count_fails_the_unsharded_layout(tmp_path):
    """The measurement can fail: the layout before sharding hands out whole blocks (all 700 targets)."""
    url = str(tmp_path / "s")
    build(url, old_layout=True)
    targets = slice(256, 512)
    share = BLOCKS * (4 * 256 * K * 4 + N_TRAIN * BS)  # uncompressed share: an upper bound on the stored one
    st, counting = counted_handle(url)
    st.read_masks()
    st.read_logits(targets=targets)
    assert sum(n for _, n in counting.reads) > 1.5 * share


# --------------------------------------------------------------------------- stores written before sharding


def test_a_store_written_before_sharding_is_read_and_grown_as_it_is(url, tmp_path):
    st = build(url, old_layout=True)
    arr = st.zarr_array(LOGITS)
    assert arr.shards is None and arr.chunks == (BS, N_POINTS, K) and "target_chunk" not in arr.attrs
    ro = AttributionStore.open(url)
    for sl in SLICES:
        np.testing.assert_array_equal(ro.read_logits(targets=sl), expected_logits(range(BLOCKS))[:, sl])
    masks, logits, blocks = ro.read()
    assert blocks == [0, 1, 2] and logits.shape == (BS * BLOCKS, N_POINTS, K)
    # growing it (a later `dmm estimate --num-models`) keeps its layout and its rows
    grown = AttributionStore.open_or_create(url, make_spec(), num_models=BS * (BLOCKS + 1))
    assert grown.num_blocks == BLOCKS + 1 and grown.zarr_array(LOGITS).shards is None
    extra = block_data(BLOCKS)
    grown.write_block(BLOCKS, *extra)
    np.testing.assert_array_equal(grown.read_logits(targets=slice(600, 700)),
                                  np.concatenate([expected_logits(range(BLOCKS)), extra[1]])[:, 600:700])


def test_reading_an_old_store_writes_nothing(tmp_path):
    url = str(tmp_path / "s")
    build(url, old_layout=True)
    before = tree_hashes(Path(url))
    ro = AttributionStore.open(url)
    ro.read()
    ro.read_logits(targets=slice(3, 500))
    assert tree_hashes(Path(url)) == before


def test_a_block_split_over_objects_is_refused(tmp_path):
    """Two writers in one object are impossible by construction; a logits array whose objects split a block's
    targets (or span two blocks) is not a store this code writes: refused with a one-line error."""
    url = str(tmp_path / "s")
    spec = make_spec()
    AttributionStore.open_or_create(url, spec, num_models=BS * BLOCKS)
    group = zarr.open_group(make_store(url, read_only=False), mode="r+", zarr_format=3)
    group.create_array(LOGITS, shape=(BS * BLOCKS, N_POINTS, K), chunks=(BS, 256, K), dtype="float32",
                       fill_value=0.0, compressors=COMPRESSORS, config=ARRAY_CONFIG, overwrite=True,
                       attributes=array_attrs(spec.fingerprint, "logits"))
    with pytest.raises(StoreError, match=r"chunking disagrees.*fix: rebuild the store") as exc:
        AttributionStore.open(url).completed_blocks()
    assert "\n" not in str(exc.value)
