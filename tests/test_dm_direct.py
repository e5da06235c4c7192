"""DM-Direct on a synthetic store: the sum of F's β rows, read row by row, and the forget set's checks."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

import attribution.fit_group as fit_group
from attribution.ids import IdsError
from fixtures_synthetic import N_POINTS, N_TRAIN, synthetic_store
from matching.direct import dm_direct_targets
from matching.errors import MatchingError
from matching.inputs import forget_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("attribution", ["datamodels", "trak"])
def test_dm_direct_is_theta0_minus_the_sum_of_forget_rows(tmp_path, monkeypatch, attribution):
    store, betas, original = synthetic_store(tmp_path / "s.zarr")
    forget = np.array([1, 5, 7, 11])
    expected = original.astype(np.float64).copy()
    for i in forget:
        expected -= betas[attribution][i]
    monkeypatch.setattr(fit_group, "ROW_BATCH", 3)  # two reads of F's rows
    np.testing.assert_allclose(dm_direct_targets(store, forget, attribution), expected, rtol=1e-5, atol=1e-5)
    other = original + 1
    np.testing.assert_allclose(dm_direct_targets(store, forget, attribution, original_logits=other),
                               expected + 1, rtol=1e-5, atol=1e-5)


def test_dm_direct_reads_only_the_weight_rows_of_f(tmp_path, monkeypatch):
    store, _, _ = synthetic_store(tmp_path / "s.zarr")
    read_keys = []
    real_get = zarr.storage.LocalStore.get

    async def spy(self, key, *args, **kwargs):
        read_keys.append(key)
        return await real_get(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", spy)
    dm_direct_targets(store, np.array([2, 9]))
    weight_chunks = [k for k in read_keys if k.startswith("datamodels/weight/c/")]
    assert weight_chunks, read_keys
    assert {int(k.split("/")[3]) for k in weight_chunks} == {2, 9}  # key c/<row>/<target chunk>/0


def test_dm_direct_refuses_a_store_without_a_complete_fit(tmp_path):
    store, _, _ = synthetic_store(tmp_path / "none.zarr", fit=())
    with pytest.raises(MatchingError, match="no fitted datamodels"):
        dm_direct_targets(store, [1])
    store, _, _ = synthetic_store(tmp_path / "part.zarr", fit=("datamodels",), complete=False)
    with pytest.raises(MatchingError, match="2/3 datamodels target chunks"):
        dm_direct_targets(store, [1])
    with pytest.raises(MatchingError, match="no fitted trak"):
        dm_direct_targets(store, [1], "trak")


def test_forget_set_from_a_sequence_is_checked_like_an_id_file(tmp_path):
    store, _, _ = synthetic_store(tmp_path / "s.zarr", fit=())
    assert forget_set([5, 1, 3], store).tolist() == [1, 3, 5]
    for bad, needle in [([], "no ids"), ([1.5], "not an integer"), ([-1], "negative"), ([N_TRAIN], "held-out"),
                        ([N_POINTS], "out of range"), ([2, 2], "listed 2 times"), (["a"], "integer training")]:
        with pytest.raises(IdsError, match=needle):
            forget_set(bad, store)
