"""Forget-set specs: random, class, pc and ids, against hand computations and brute force."""
from __future__ import annotations

import numpy as np
import pytest

from attribution.datasets import make_dataset
from matching.forget_sets import (ForgetSetError, margin_datamodel_matrix, parse_forget_set,
                                  principal_component_scores, resolve_forget_set)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    return make_dataset("toy", rng.normal(size=(40, 3)).astype(np.float32), y,
                        rng.normal(size=(8, 3)).astype(np.float32), np.arange(8) % 4)


def test_random_is_seeded_and_of_the_asked_size(data):
    a = resolve_forget_set("random:7:3", data)
    assert a.dtype == np.int64 and len(a) == 7 == len(set(a.tolist()))
    assert np.array_equal(a, np.sort(np.random.default_rng(3).choice(40, 7, replace=False)))
    assert not np.array_equal(a, resolve_forget_set("random:7:4", data))


def test_class_takes_only_points_of_that_class(data):
    ids = resolve_forget_set("class:2:6", data)
    assert len(ids) == 6 and set(data.y_train[ids].tolist()) == {2}
    assert np.array_equal(resolve_forget_set("class:2:10", data), np.arange(20, 30))


def test_ids_reads_a_file(data, tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("5 1 9")
    assert resolve_forget_set(f"ids:{path}", data).tolist() == [1, 5, 9]


@pytest.mark.parametrize("spec, match", [
    ("random:5", "unknown forget set"), ("klass:1:2", "unknown forget set"), ("random:x:1", "non-integer"),
    ("pc:0:5:top", "count from 1"), ("pc:1:5:middle", "unknown forget set"), ("ids:", "unknown forget set"),
])
def test_malformed_specs_are_refused_with_the_valid_forms(spec, match):
    with pytest.raises(ForgetSetError, match=match):
        parse_forget_set(spec)


@pytest.mark.parametrize("spec, match", [("random:41:0", "40 are available"), ("class:1:11", "10 are available"),
                                         ("class:9:1", "class 9 does not exist"), ("pc:1:5:top", "needs fitted")])
def test_impossible_sets_are_refused(data, spec, match):
    with pytest.raises(ForgetSetError, match=match):
        resolve_forget_set(spec, data)


def test_margin_datamodel_matrix_equals_a_brute_force_loop():
    rng = np.random.default_rng(1)
    n, p, k = 9, 12, 3
    weight, labels = rng.normal(size=(n, p, k)).astype(np.float32), rng.integers(0, k, size=p)
    expected = np.empty((n, n))
    for x in range(n):
        for i in range(n):
            others = [weight[i, x, c] for c in range(k) if c != labels[x]]
            expected[x, i] = weight[i, x, labels[x]] - np.mean(others)
    np.testing.assert_allclose(margin_datamodel_matrix(weight, labels, n, chunk=4), expected, rtol=1e-5, atol=1e-6)


def test_principal_component_scores_match_numpy_svd_up_to_sign():
    rng = np.random.default_rng(2)
    matrix = rng.normal(size=(30, 30)) * np.linspace(3, 0.1, 30)  # distinct singular values
    centred = matrix - matrix.mean(axis=0)
    _, _, vt = np.linalg.svd(centred)
    for k in (1, 2):
        ours = principal_component_scores(matrix, k)
        ref = centred @ vt[k - 1]
        sign = np.sign(ours @ ref)
        np.testing.assert_allclose(ours, sign * ref, rtol=1e-4, atol=1e-4)  # randomized SVD


class _Fit:
    def __init__(self, weight):
        self.weight = weight


def test_pc_top_and_bottom_pick_the_extremes_of_a_planted_component(data):
    """β planted so that row x of M is s_x · u: PC 1 scores are ∝ s, so top/bottom are the largest/smallest s."""
    n, p, k = data.n_train, data.n_points, data.num_classes
    rng = np.random.default_rng(3)
    s, u = rng.permutation(np.linspace(-1, 1, n)), rng.normal(size=n)
    weight = np.zeros((n, p, k), dtype=np.float32)
    labels = data.y_train.numpy()
    weight[:, np.arange(n), labels] = (s[:, None] * u[None, :]).T  # β_{i,x,y_x} = s_x u_i, other classes 0
    top = resolve_forget_set("pc:1:5:top", data, _Fit(weight))
    bottom = resolve_forget_set("pc:1:5:bottom", data, _Fit(weight))
    extremes = {tuple(np.sort(np.argsort(s)[-5:])), tuple(np.sort(np.argsort(s)[:5]))}
    assert {tuple(top), tuple(bottom)} == extremes and not set(top) & set(bottom)
