"""β's row-major copy (`<prefix>/weight_rows`, attribution/row_copy.py): written by `dmm fit` and `dmm trak`
after the last target chunk, read by `FitGroup.read_weight_rows` only when complete, one object per forget row.

Two small stores on the class-balanced digits subset (300 train / 500 points), with synthetic subset-model
logits (masks @ a sparse β + noise: no training, and the fit finds non-zero β): one fitted by `fit_store` with
4 target chunks, one scored by `run_trak` with (64, 128, k) weight chunks. Tests change copies of them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from attribution import store_zarr, trak
from attribution.row_copy import ROWS, write_row_copy
from attribution.recipes import default_recipe
from attribution.store import AttributionStore, StoreError
from attribution.subsets import block_subsets
from cluster.fit import FitConfig, fit_store

from fixtures_store import DigitsStore, digits_subset

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:lasso:RuntimeWarning")]  # max_iter=50 is cut short on purpose

BLOCK = 32
FIT = FitConfig(holdout_models=16, path_length=4, tol=1e-3, max_iter=50, targets_per_chunk=128)
TRAK = trak.TrakSettings(checkpoints=2, proj_dim=128, holdout_models=16, target_chunk=128, row_chunk=64)
FORGET = np.sort(np.random.default_rng(1).choice(300, 20, replace=False))


def synthetic_store(root: Path, num_models: int) -> str:
    """A store of `num_models` subset models whose logits are masks @ β_true + noise (β_true 5 % non-zero)."""
    data = digits_subset(root / "digits-subset.npz")
    fixture = DigitsStore(str(root / "s.zarr"), data, default_recipe("digits"))
    store = AttributionStore.open_or_create(fixture.url, fixture.spec(block_size=BLOCK), num_models)
    rng = np.random.default_rng(0)
    shape = (data.n_train, data.n_points * data.num_classes)
    beta = (rng.random(shape) < 0.05) * rng.standard_normal(shape)
    for block in store.missing_blocks():
        masks, _ = block_subsets(0, block, BLOCK, data.n_train, 0.5)
        logits = masks @ beta + 0.1 * rng.standard_normal((BLOCK, shape[1]))
        store.write_block(block, masks, logits.reshape(BLOCK, data.n_points, data.num_classes).astype(np.float32))
    return fixture.url


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, one_torch_thread) -> str:
    """A store with `datamodels/` fitted by `fit_store`; read-only, tests change copies."""
    url = synthetic_store(tmp_path_factory.mktemp("dm"), 128)
    fit_store(url, FIT)
    return url


@pytest.fixture(scope="module")
def scored(tmp_path_factory, one_torch_thread) -> str:
    """A store with `trak/` written by `run_trak`; read-only."""
    url = synthetic_store(tmp_path_factory.mktemp("trak"), 64)
    trak.run_trak(AttributionStore.open(url, "r+"), TRAK)
    return url


def copy_of(url: str, tmp_path: Path) -> str:
    return str(shutil.copytree(url, tmp_path / "s.zarr"))


def keys_read(group, rows, read: str = "read_weight_rows") -> tuple[np.ndarray, list[str]]:
    """(group.<read>(rows), the keys of every object the call fetched from the store: through the store's
    `get`, or read as a file of a local store by `store_zarr.fetch_objects`)."""
    store = group.weight.store_path.store
    keys, get, read_file = [], store.get, store_zarr._read_file

    async def counting_get(key, *args, **kwargs):
        keys.append(key)
        return await get(key, *args, **kwargs)

    def counting_read(path):
        keys.append(path.relative_to(store.root).as_posix())
        return read_file(path)

    store.get, store_zarr._read_file = counting_get, counting_read
    try:
        return getattr(group, read)(rows), keys
    finally:
        del store.get
        store_zarr._read_file = read_file


def bits(array) -> bytes:
    return np.asarray(array[...]).tobytes()


@pytest.mark.parametrize("prefix", ["datamodels", "trak"])
def test_the_copy_is_weight_bit_for_bit_one_chunk_per_row(prefix, request):
    url = request.getfixturevalue({"datamodels": "fitted", "trak": "scored"}[prefix])
    group = AttributionStore.open(url).fit_group(prefix)
    n, p, k = group.weight.shape
    assert group.weight_rows is not None and group.weight_rows.attrs["complete"] is True
    assert group.weight_rows.chunks == (1, p, k) and group.weight_rows.shape == (n, p, k)
    assert group.weight.chunks == ({"datamodels": 1, "trak": 64}[prefix], 128, k)
    weight = np.asarray(group.weight[...])
    assert np.count_nonzero(weight) > weight.size // 100  # a real β, not zeros
    assert bits(group.weight_rows) == weight.tobytes()
    assert AttributionStore.open(url).summary()[prefix]["row_copy"] is True


@pytest.mark.parametrize("prefix", ["datamodels", "trak"])
def test_a_request_reads_one_object_per_forget_row(prefix, request):
    url = request.getfixturevalue({"datamodels": "fitted", "trak": "scored"}[prefix])
    group = AttributionStore.open(url).fit_group(prefix)
    got, keys = keys_read(group, FORGET)
    assert got.tobytes() == np.asarray(group.weight.oindex[FORGET, :, :]).tobytes()
    assert len(keys) <= 2 * len(FORGET)
    assert sorted(keys) == sorted(f"{prefix}/{ROWS}/c/{i}/0/0" for i in FORGET)


@pytest.mark.parametrize("scheme", ["", "file://"])  # a local path (files read directly), an fsspec URL
@pytest.mark.parametrize("prefix", ["datamodels", "trak"])
def test_the_forget_sum_decodes_one_object_per_row_and_equals_zarrs_sum(prefix, scheme, request):
    """`sum_weight_rows` (DM-Direct's Σ_{i∈F} β_i) fetches the copy's objects itself: the same float64 sums as
    summing Zarr's own read, one object per row; an empty F sums to zeros; a bad id is refused."""
    url = request.getfixturevalue({"datamodels": "fitted", "trak": "scored"}[prefix])
    group = AttributionStore.open(scheme + url).fit_group(prefix)
    got, keys = keys_read(group, FORGET, "sum_weight_rows")
    assert got.dtype == np.float64 and np.count_nonzero(got) > got.size // 2
    assert got.tobytes() == np.asarray(group.weight.oindex[FORGET, :, :]).sum(axis=0, dtype=np.float64).tobytes()
    assert sorted(keys) == sorted(f"{prefix}/{ROWS}/c/{i}/0/0" for i in FORGET)
    assert not group.sum_weight_rows([]).any() and group.sum_weight_rows([]).shape == got.shape
    with pytest.raises(StoreError, match=r"rows must be train indices in \[0, 300\)"):
        group.sum_weight_rows([300])


def test_without_a_complete_copy_the_forget_sum_reads_weight(fitted, tmp_path):
    url = copy_of(fitted, tmp_path)
    AttributionStore.open(url, "r+").zarr_array(f"datamodels/{ROWS}").attrs.update({"complete": False})
    group = AttributionStore.open(url).fit_group("datamodels")
    got, keys = keys_read(group, FORGET, "sum_weight_rows")
    assert all(key.startswith("datamodels/weight/c/") for key in keys)
    assert got.tobytes() == np.asarray(group.weight.oindex[FORGET, :, :]).sum(axis=0, dtype=np.float64).tobytes()


def test_a_store_without_the_copy_reads_weight_and_a_rerun_adds_the_copy(fitted, tmp_path):
    url = copy_of(fitted, tmp_path)
    shutil.rmtree(Path(url) / "datamodels" / ROWS)  # the layout before the copy existed
    group = AttributionStore.open(url).fit_group("datamodels")
    assert group.weight_rows is None and AttributionStore.open(url).summary()["datamodels"]["row_copy"] is False
    got, keys = keys_read(group, FORGET)
    assert got.tobytes() == np.asarray(group.weight.oindex[FORGET, :, :]).tobytes()
    assert len(keys) == 4 * len(FORGET) and all(key.startswith("datamodels/weight/c/") for key in keys)
    assert fit_store(url, FIT)["chunks_fitted"] == 0  # complete: fits nothing, writes the copy
    group = AttributionStore.open(url).fit_group("datamodels")
    assert bits(group.weight_rows) == bits(group.weight)


def test_a_half_written_copy_is_not_read_and_is_rewritten(fitted, tmp_path):
    url = copy_of(fitted, tmp_path)
    rows = AttributionStore.open(url, "r+").zarr_array(f"datamodels/{ROWS}")
    rows.attrs.update({"complete": False})
    rows[FORGET[:5]] = np.full((5, *rows.shape[1:]), 7.0, np.float32)  # a crash mid-copy left garbage
    group = AttributionStore.open(url).fit_group("datamodels")
    assert group.weight_rows is None
    assert group.read_weight_rows(FORGET).tobytes() == np.asarray(group.weight.oindex[FORGET, :, :]).tobytes()
    assert write_row_copy(AttributionStore.open(url, "r+").fit_group("datamodels"))
    group = AttributionStore.open(url).fit_group("datamodels")
    assert bits(group.weight_rows) == bits(group.weight)


def test_refitting_a_chunk_invalidates_the_copy_until_it_is_rewritten(fitted, tmp_path):
    url = copy_of(fitted, tmp_path)
    store = AttributionStore.open(url, "r+")
    group = store.fit_group("datamodels")
    with pytest.raises(StoreError, match=f"datamodels/{ROWS} .* is a complete copy of β; fix: reopen") as err:
        group.write_chunk(1, np.zeros((300, 128, 10)), np.zeros((128, 10)))
    assert "\n" not in str(err.value)
    group.done[1] = False
    group = store.create_fit_group("datamodels", FIT.targets_per_chunk, FIT.rows_per_chunk, group.config)
    assert group.weight_rows is None and store.zarr_array(f"datamodels/{ROWS}").attrs["complete"] is False
    new = np.random.default_rng(2).standard_normal((300, 128, 10)).astype(np.float32)
    group.write_chunk(1, new, np.zeros((128, 10)))
    reader = AttributionStore.open(url).fit_group("datamodels")
    assert reader.read_weight_rows(FORGET)[:, 128:256].tobytes() == new[FORGET].tobytes()
    assert write_row_copy(group) and not write_row_copy(group)  # written once, then kept
    reader = AttributionStore.open(url).fit_group("datamodels")
    assert reader.weight_rows is not None and bits(reader.weight_rows) == bits(reader.weight)
    assert reader.read_weight_rows(FORGET)[:, 128:256].tobytes() == new[FORGET].tobytes()


def test_an_incomplete_group_gets_no_copy_and_overwrite_drops_it(fitted, tmp_path):
    url = copy_of(fitted, tmp_path)
    store = AttributionStore.open(url, "r+")
    fresh = store.create_fit_group("datamodels", 64, 1, {"other": 1}, overwrite=True)
    assert not store.has(f"datamodels/{ROWS}") and fresh.weight_rows is None
    assert not write_row_copy(fresh) and not store.has(f"datamodels/{ROWS}")
    with pytest.raises(StoreError, match="read-only"):
        write_row_copy(AttributionStore.open(url).fit_group("datamodels"))
