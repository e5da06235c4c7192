"""Tests for the Zarr v3 attribution store (attribution/store.py). Fast, no Ray."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from attribution.store import (
    SCHEMA_VERSION,
    AttributionStore,
    StoreError,
    StoreMismatch,
    StoreSpec,
    schema_table,
)
from attribution.fit_group import create_fit_group
from attribution.target_subset import parse_targets
from fixtures_store import tree_hashes

N_TRAIN, N_POINTS, K, BS = 12, 17, 3, 4


def make_spec(**over) -> StoreSpec:
    base = dict(
        dataset="digits",
        fingerprint=hashlib.sha256(b"digits").hexdigest(),
        model="mlp",
        recipe={"epochs": 3, "lr": 0.1, "layers": [32, 32]},
        alpha=0.5,
        seed=0,
        block_size=BS,
        n_train=N_TRAIN,
        n_points=N_POINTS,
        num_classes=K,
    )
    base.update(over)
    return StoreSpec(**base)


def block_data(block: int, bs: int = BS):
    rng = np.random.default_rng(1000 + block)
    masks = rng.random((bs, N_TRAIN)) < 0.5
    logits = rng.standard_normal((bs, N_POINTS, K)).astype(np.float32)
    return masks, logits


@pytest.fixture
def mem_url():
    return f"memory://dmm-store-test-{uuid.uuid4().hex}"


def roundtrip(url: str):
    spec = make_spec()
    st = AttributionStore.open_or_create(url, spec, num_models=10)  # 3 blocks of 4
    assert st.num_models == 10 and st.num_blocks == 3 and st.allocated_models == 12
    assert st.completed_blocks() == [] and st.missing_blocks() == [0, 1, 2]
    assert st.block_rows(1) == slice(4, 8)
    for b in (0, 2):
        st.write_block(b, *block_data(b))

    ro = AttributionStore.open(url)
    assert ro.spec == spec
    assert ro.attrs["schema_version"] == SCHEMA_VERSION
    assert ro.completed_blocks() == [0, 2] and ro.missing_blocks() == [1]
    assert ro.completed_models() == 8
    masks, logits, blocks = ro.read()
    assert blocks == [0, 2]
    assert masks.dtype == bool and masks.shape == (8, N_TRAIN)
    assert logits.dtype == np.float32 and logits.shape == (8, N_POINTS, K)
    np.testing.assert_array_equal(masks, np.concatenate([block_data(0)[0], block_data(2)[0]]))
    np.testing.assert_array_equal(logits, np.concatenate([block_data(0)[1], block_data(2)[1]]))
    np.testing.assert_array_equal(ro.read_masks([2]), block_data(2)[0])
    np.testing.assert_array_equal(ro.read_logits([0], targets=slice(5, 9)), block_data(0)[1][:, 5:9])
    with pytest.raises(StoreError, match="not complete"):
        ro.read_masks([1])
    with pytest.raises(StoreError, match="read-only"):
        ro.write_block(1, *block_data(1))
    for path in ("subsets/masks", "subsets/logits", "subsets/done"):
        a = ro.zarr_array(path).attrs
        assert a["fingerprint"] == spec.fingerprint and a["schema_version"] == SCHEMA_VERSION
    summ = ro.summary()
    assert summ["completed_models"] == 8 and summ["num_models"] == 10 and summ["model"] == "mlp"
    # a pickled handle reopens by URL (how Ray tasks get it)
    again = pickle.loads(pickle.dumps(ro))
    assert again.completed_blocks() == [0, 2] and again.mode == "r"
    # same request again: opens, keeps data
    st2 = AttributionStore.open_or_create(url, make_spec(recipe={"layers": (32, 32), "lr": 0.1, "epochs": 3}), 10)
    assert st2.completed_blocks() == [0, 2]
    return st2


def test_roundtrip_local(tmp_path):
    assert roundtrip(str(tmp_path / "store.zarr")).completed_models() == 2 * BS


def test_roundtrip_file_url(tmp_path):
    roundtrip((tmp_path / "store.zarr").as_uri())
    assert (tmp_path / "store.zarr" / "zarr.json").exists()


def test_roundtrip_memory(mem_url):
    assert roundtrip(mem_url).completed_models() == 2 * BS


def test_empty_read_shapes(mem_url):
    st = AttributionStore.open_or_create(mem_url, make_spec(), 4)
    assert st.read_masks().shape == (0, N_TRAIN)
    assert st.read_logits().shape == (0, N_POINTS, K)
    assert st.read_logits(targets=slice(0, 5)).shape == (0, 5, K)


@pytest.mark.parametrize(
    "field,value",
    [
        ("dataset", "mnist1d"),
        ("fingerprint", hashlib.sha256(b"other").hexdigest()),
        ("model", "cnn"),
        ("recipe", {"epochs": 4, "lr": 0.1, "layers": [32, 32]}),
        ("alpha", 0.25),
        ("seed", 1),
        ("block_size", 2),
        ("n_train", N_TRAIN + 1),
        ("n_points", N_POINTS + 1),
        ("num_classes", K + 1),
    ],
)
def test_mismatch_refused_and_nothing_written(tmp_path, field, value):
    url = str(tmp_path / "store.zarr")
    st = AttributionStore.open_or_create(url, make_spec(), 8)
    st.write_block(0, *block_data(0))
    before = tree_hashes(tmp_path)
    with pytest.raises(StoreMismatch, match=field) as exc:
        AttributionStore.open_or_create(url, make_spec(**{field: value}), 8)
    assert "\n" not in str(exc.value) and "fix:" in str(exc.value)
    assert tree_hashes(tmp_path) == before


def test_mismatch_message_names_all_keys(mem_url):
    AttributionStore.open_or_create(mem_url, make_spec(), 4)
    with pytest.raises(StoreMismatch) as exc:
        AttributionStore.open_or_create(mem_url, make_spec(model="cnn", seed=3, recipe={"lr": 1}), 4)
    msg = str(exc.value)
    assert "model store='mlp' request='cnn'" in msg and "seed" in msg and "recipe.lr" in msg
    assert "recipe.epochs" in msg and "fingerprint store=" not in msg


def test_check(mem_url):
    spec = make_spec()
    st = AttributionStore.open_or_create(mem_url, spec, 4)
    st.check(fingerprint=spec.fingerprint, model="mlp", alpha=0.5, recipe=dict(spec.recipe))
    with pytest.raises(StoreMismatch, match="fingerprint"):
        st.check(fingerprint="0" * 64, model="mlp")
    with pytest.raises(StoreError, match="unknown"):
        st.check(colour="blue")


def test_block_without_marker_is_invisible(tmp_path):
    url = str(tmp_path / "s.zarr")
    st = AttributionStore.open_or_create(url, make_spec(), 12)
    st.write_block(0, *block_data(0))
    # simulate a crash inside write_block(1): data chunks written, marker never set
    masks, logits = block_data(1)
    st.zarr_array("subsets/masks")[st.block_rows(1)] = masks
    st.zarr_array("subsets/logits")[st.block_rows(1)] = logits
    ro = AttributionStore.open(url)
    assert ro.completed_blocks() == [0]
    assert ro.missing_blocks() == [1, 2]
    assert ro.completed_models() == BS
    assert ro.read_masks().shape == (BS, N_TRAIN)
    np.testing.assert_array_equal(ro.read_logits(), block_data(0)[1])
    # resume completes it
    st.write_block(1, masks, logits)
    assert AttributionStore.open(url).completed_blocks() == [0, 1]


def test_grow_keeps_rows_and_shrink_refused(tmp_path):
    url = str(tmp_path / "s.zarr")
    st = AttributionStore.open_or_create(url, make_spec(), 6)  # 2 blocks
    assert st.num_blocks == 2
    for b in (0, 1):
        st.write_block(b, *block_data(b))
    st2 = AttributionStore.open_or_create(url, make_spec(), 13)  # grows to 4 blocks
    assert (st2.num_models, st2.num_blocks, st2.allocated_models) == (13, 4, 16)
    assert st2.zarr_array("subsets/masks").shape == (16, N_TRAIN)
    assert st2.zarr_array("subsets/done").shape == (4,)
    assert st2.completed_blocks() == [0, 1] and st2.missing_blocks() == [2, 3]
    m, lg, _ = st2.read()
    np.testing.assert_array_equal(m, np.concatenate([block_data(0)[0], block_data(1)[0]]))
    np.testing.assert_array_equal(lg, np.concatenate([block_data(0)[1], block_data(1)[1]]))
    st2.ensure_capacity(15)  # same allocation, larger request
    assert st2.num_models == 15 and st2.num_blocks == 4
    before = tree_hashes(tmp_path)
    with pytest.raises(StoreError, match="shrinking"):
        st2.ensure_capacity(8)
    with pytest.raises(StoreError, match="shrinking"):
        AttributionStore.open_or_create(url, make_spec(), 8)
    assert tree_hashes(tmp_path) == before
    assert AttributionStore.open(url).num_models == 15


def test_open_non_store_paths(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(StoreError, match="no attribution store"):
        AttributionStore.open(str(missing))
    assert not missing.exists()  # opening must not create the directory
    with pytest.raises(StoreError, match="no attribution store"):
        AttributionStore.open(str(missing), mode="r+")
    assert not missing.exists()

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(StoreError):
        AttributionStore.open(str(junk))
    before = tree_hashes(junk)
    with pytest.raises(StoreError, match="not an attribution store"):
        AttributionStore.open_or_create(str(junk), make_spec(), 4)
    assert tree_hashes(junk) == before

    other = tmp_path / "other.zarr"
    zarr.create_group(str(other), attributes={"hello": 1})
    with pytest.raises(StoreError, match="not an attribution store"):
        AttributionStore.open(str(other))
    with pytest.raises(StoreError, match="not an attribution store"):
        AttributionStore.open_or_create(str(other), make_spec(), 4)


def test_memory_non_store(mem_url):
    with pytest.raises(StoreError, match="no attribution store"):
        AttributionStore.open(mem_url)


def test_wrong_schema_version(tmp_path):
    url = str(tmp_path / "s.zarr")
    AttributionStore.open_or_create(url, make_spec(), 4)
    zarr.open_group(url, mode="r+").attrs.update({"schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(StoreError, match="schema version"):
        AttributionStore.open(url)
    with pytest.raises(StoreError, match="schema version"):
        AttributionStore.open_or_create(url, make_spec(), 4)


def test_empty_dir_is_fine(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    st = AttributionStore.open_or_create(str(d), make_spec(), 4)
    assert st.num_blocks == 1


def test_rewrite_block_is_byte_identical(tmp_path):
    url = str(tmp_path / "s.zarr")
    st = AttributionStore.open_or_create(url, make_spec(), 8)
    st.write_block(1, *block_data(1))
    before = tree_hashes(tmp_path)
    st.write_block(1, *block_data(1))
    AttributionStore.open(url, mode="r+").write_block(1, *block_data(1))
    assert tree_hashes(tmp_path) == before


def test_same_data_same_bytes_across_stores(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root, order in ((a, (0, 1)), (b, (1, 0))):
        st = AttributionStore.open_or_create(str(root), make_spec(), 8)
        for blk in order:
            st.write_block(blk, *block_data(blk))
    assert tree_hashes(a) == tree_hashes(b)


def test_write_block_validates(mem_url):
    st = AttributionStore.open_or_create(mem_url, make_spec(), 4)
    m, lg = block_data(0)
    with pytest.raises(StoreError, match="masks have shape"):
        st.write_block(0, m[:2], lg)
    with pytest.raises(StoreError, match="logits have shape"):
        st.write_block(0, m, lg[:, :3])
    bad = lg.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(StoreError, match="NaN"):
        st.write_block(0, m, bad)
    with pytest.raises(StoreError, match="out of range"):
        st.write_block(1, m, lg)
    assert st.completed_blocks() == []
    st.write_block(0, m.astype(np.uint8), lg.astype(np.float64))  # 0/1 masks and float64 accepted
    np.testing.assert_array_equal(st.read_masks(), m)


def test_spec_validation():
    with pytest.raises(StoreError, match="alpha"):
        make_spec(alpha=1.5)
    with pytest.raises(StoreError, match="n_points"):
        make_spec(n_points=N_TRAIN - 1)
    with pytest.raises(StoreError, match="JSON"):
        make_spec(recipe={"f": object()})
    with pytest.raises(StoreError):
        AttributionStore.open_or_create("memory://x", make_spec(), 0)


def test_fit_group(tmp_path):
    url = str(tmp_path / "s.zarr")
    st = AttributionStore.open_or_create(url, make_spec(), 8)
    fg = st.create_fit_group("datamodels", target_chunk=5, row_chunk=4, config={"num_models": 8})
    assert fg.num_chunks == 4 and fg.weight.shape == (N_TRAIN, N_POINTS, K)
    assert fg.weight.chunks == (4, 5, K) and fg.bias.chunks == (5, K)
    assert fg.target_slice(3) == slice(15, 17)
    rng = np.random.default_rng(0)
    W = rng.standard_normal((N_TRAIN, N_POINTS, K)).astype(np.float32)
    B = rng.standard_normal((N_POINTS, K)).astype(np.float32)
    for c in (0, 3):
        sl = fg.target_slice(c)
        fg.write_chunk(c, W[:, sl], B[sl], lam=np.full((sl.stop - sl.start, K), 0.1), lds=None)
    # crash inside chunk 1: weight written, no marker
    fg.weight[:, fg.target_slice(1)] = W[:, fg.target_slice(1)]
    ro = AttributionStore.open(url)
    rfg = ro.fit_group("datamodels")
    assert rfg.completed_chunks() == [0, 3] and rfg.missing_chunks() == [1, 2] and not rfg.is_complete()
    np.testing.assert_array_equal(rfg.read_weight_rows([2, 7], targets=slice(0, 5)), W[[2, 7], 0:5])
    np.testing.assert_array_equal(rfg.read_weight_rows([3])[:, 15:], W[[3], 15:])
    assert rfg.read_weight_rows([]).shape == (0, N_POINTS, K)
    np.testing.assert_array_equal(rfg.read_bias(slice(15, 17)), B[15:17])
    assert np.isnan(rfg.lds[:]).all()
    for arr in (rfg.weight, rfg.bias, rfg.lam, rfg.lds, rfg.done):
        assert arr.attrs["fingerprint"] == st.fingerprint and arr.attrs["schema_version"] == SCHEMA_VERSION
    assert ro.summary()["datamodels"]["completed_chunks"] == 2 and ro.summary()["trak"] is None
    with pytest.raises(StoreError, match="no trak group"):
        ro.fit_group("trak")
    # same settings: resume; different: refused, nothing written; overwrite: fresh group
    assert st.create_fit_group("datamodels", 5, 4, {"num_models": 8}).completed_chunks() == [0, 3]
    before = tree_hashes(tmp_path)
    with pytest.raises(StoreMismatch, match=re.escape(
            'datamodels group in ' + url + ' was fitted differently: config store={"num_models": 8} '
            'request={"num_models": 16}; fix: pass the same settings to resume, or overwrite=True to refit')):
        st.create_fit_group("datamodels", 5, 4, {"num_models": 16})
    with pytest.raises(StoreMismatch, match=r"fitted differently: target_chunk store=5 request=6; fix: "):
        st.create_fit_group("datamodels", 6, 4, {"num_models": 8})
    assert tree_hashes(tmp_path) == before
    fresh = st.create_fit_group("datamodels", 6, 4, {"num_models": 16}, overwrite=True)
    assert fresh.completed_chunks() == [] and fresh.num_chunks == 3
    assert st.completed_blocks() == []  # subsets untouched by refit
    trak = st.create_fit_group("trak", 100, 100)
    assert (trak.target_chunk, trak.row_chunk, trak.num_chunks) == (N_POINTS, N_TRAIN, 1)


def test_original_logits(mem_url):
    st = AttributionStore.open_or_create(mem_url, make_spec(), 4)
    assert st.read_original_logits() is None and st.original_model_sha256() is None
    lg = np.arange(N_POINTS * K, dtype=np.float32).reshape(N_POINTS, K)
    st.write_original_logits(lg, "a" * 64)
    ro = AttributionStore.open(mem_url)
    np.testing.assert_array_equal(ro.read_original_logits("a" * 64), lg)
    with pytest.raises(StoreMismatch, match=r"original logits .*`dmm unlearn`"):
        ro.read_original_logits("b" * 64)
    st.write_original_logits(lg + 1, "b" * 64)
    np.testing.assert_array_equal(AttributionStore.open(mem_url).read_original_logits("b" * 64), lg + 1)
    assert st.zarr_array("original/logits").attrs["fingerprint"] == st.fingerprint


def test_schema_table_covers_every_array(mem_url):
    """Every array a store can hold (a target-subset fit, a calibration's size effect and spread included) is in
    the table, and so is every attr of a calibrated fit group."""
    st = AttributionStore.open_or_create(mem_url, make_spec(), 4)
    fit = create_fit_group(st, "datamodels", 8, 8, targets=parse_targets("random:5:0", N_POINTS))
    st.create_fit_group("trak", 8, 8)
    record = {"scale_self": 0.8, "scale_cross": 0.7, "models": 4, "alpha": 0.95, "targets": 5, "correlation": 0.5,
              "full_models": 2, "spread_gamma": 0.5}
    fit.write_deletion_scale(record, np.zeros((5, K)), np.zeros(st.spec.n_train))
    st.write_original_logits(np.zeros((N_POINTS, K), np.float32), "c" * 64)
    table = schema_table()
    assert table.startswith("| array | shape | dtype | chunks | meaning |")
    paths = [p for p, node in st.group.members(max_depth=None) if isinstance(node, zarr.Array)]
    assert len(paths) == 19
    for p in paths:
        assert f"`{p}`" in table or (p.startswith("trak/") and "`trak/*`" in table), p
        assert st.zarr_array(p).attrs["fingerprint"] == st.fingerprint
    group_row = next(line for line in table.splitlines() if line.startswith("| `datamodels/` (group attrs)"))
    for key in [*st.group["datamodels"].attrs, *record]:
        if key not in ("fingerprint", "schema_version", "targets", "deletion_scale"):  # the footer; the rows
            assert key in group_row, key


def test_readme_shows_the_schema_table():
    """The README's store table is `schema_table()` verbatim, so the two cannot drift apart."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert schema_table() in readme


def test_spec_is_frozen():
    spec = make_spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.model = "x"  # type: ignore[misc]
