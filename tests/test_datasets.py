"""Dataset registry (attribution/datasets.py): digits, mnist1d, npz:PATH.

cifar10 (a tiny generated archive): tests/test_cifar10_archive.py; uint8 images in npz:PATH and npy:DIR shards:
tests/test_dataset_files.py.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attribution.datasets import (
    DatasetError,
    fingerprint_arrays,
    load_dataset,
    load_digits_dataset,
    make_dataset,
)


def assert_one_line(err: BaseException, *needles: str) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, repr(msg)
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_and_types(digits):
    assert digits.name == "digits"
    assert digits.x_train.shape == (1437, 64) and digits.x_test.shape == (360, 64)
    assert digits.y_train.shape == (1437,) and digits.y_test.shape == (360,)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.num_classes == 10 and digits.n_train == 1437 and digits.n_points == 1797
    assert digits.input_shape == (64,)
    assert float(digits.x_train.min()) >= 0.0 and float(digits.x_train.max()) <= 1.0
    assert set(digits.all_labels().tolist()) == set(range(10))
    assert torch.equal(digits.all_inputs()[:1437], digits.x_train)
    assert torch.equal(digits.all_inputs()[1437:], digits.x_test)


def test_digits_split_is_stratified(digits):
    p_train = np.bincount(digits.y_train.numpy(), minlength=10) / digits.n_train
    p_test = np.bincount(digits.y_test.numpy(), minlength=10) / len(digits.y_test)
    assert np.abs(p_train - p_test).max() <= 0.01, (p_train, p_test)


def test_digits_split_and_fingerprint_are_deterministic(digits):
    again = load_digits_dataset()  # bypasses the registry cache: a fresh load and split
    assert again is not digits
    for a, b in ((again.x_train, digits.x_train), (again.y_train, digits.y_train),
                 (again.x_test, digits.x_test), (again.y_test, digits.y_test)):
        assert torch.equal(a, b)
    assert again.fingerprint == digits.fingerprint
    assert len(digits.fingerprint) == 64 and int(digits.fingerprint, 16) >= 0
    assert digits.fingerprint == fingerprint_arrays(digits.x_train.numpy(), digits.y_train.numpy(),
                                                    digits.x_test.numpy(), digits.y_test.numpy())


def test_digits_is_scikit_learns_load_and_split_read_without_importing_it(digits):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.2, stratify=y, random_state=0)
    theirs = make_dataset("digits", x_tr, y_tr, x_te, y_te, num_classes=10)
    for a, b in ((theirs.x_train, digits.x_train), (theirs.y_train, digits.y_train),
                 (theirs.x_test, digits.x_test), (theirs.y_test, digits.y_test)):
        assert torch.equal(a, b)
    assert theirs.fingerprint == digits.fingerprint
    code = "import sys; from attribution.datasets import load_digits_dataset; load_digits_dataset(); print(sorted(" \
           "m for m in sys.modules if m.split('.')[0] == 'sklearn'))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_digits_without_scikit_learn_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError) as err:
        load_digits_dataset()
    assert_one_line(err.value, "digits.csv.gz", "pip install scikit-learn")


def test_fingerprint_changes_with_one_value_and_with_the_split(digits):
    arrays = [t.numpy().copy() for t in (digits.x_train, digits.y_train, digits.x_test, digits.y_test)]
    base = make_dataset("digits", *arrays, num_classes=10)
    assert base.fingerprint == digits.fingerprint

    x_tr = arrays[0].copy()
    x_tr[5, 7] += 1.0 / 16
    assert make_dataset("digits", x_tr, *arrays[1:], num_classes=10).fingerprint != base.fingerprint

    y_te = arrays[3].copy()
    y_te[0] = (y_te[0] + 1) % 10
    assert make_dataset("digits", *arrays[:3], y_te, num_classes=10).fingerprint != base.fingerprint

    # same points, other split: move the last train point into the held-out set
    x_all = np.concatenate([arrays[0], arrays[2]])
    y_all = np.concatenate([arrays[1], arrays[3]])
    moved = make_dataset("digits", x_all[:1436], y_all[:1436], x_all[1436:], y_all[1436:], num_classes=10)
    assert moved.fingerprint != base.fingerprint


def test_unknown_dataset_name():
    with pytest.raises(DatasetError) as e:
        load_dataset("imagenet")
    assert_one_line(e.value, "imagenet", "digits", "npz:PATH", "npy:DIR")


# ---------------------------------------------------------------- mnist1d

def test_mnist1d_offline_default_sizes():
    data = load_dataset("mnist1d")
    assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40)
    assert data.y_train.shape == (4000,) and data.y_test.shape == (1000,)
    assert data.num_classes == 10 and data.input_shape == (40,)
    assert set(data.y_train.tolist()) == set(range(10))
    assert bool(torch.isfinite(data.x_train).all())
    assert data.fingerprint != load_dataset("digits").fingerprint


# ---------------------------------------------------------------- npz:PATH

def npz_arrays(n_train=30, n_test=10, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return dict(x_train=rng.normal(size=(n_train, d)), y_train=rng.integers(0, k, n_train),
                x_test=rng.normal(size=(n_test, d)), y_test=rng.integers(0, k, n_test))


def test_npz_round_trip(tmp_path):
    arrays = npz_arrays()
    arrays["y_train"][:3] = [0, 1, 2]
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    data = load_dataset(f"npz:{path}")
    assert data.name == f"npz:{path}"
    assert data.num_classes == 3 and data.n_train == 30 and data.n_points == 40 and data.input_shape == (5,)
    np.testing.assert_array_equal(data.x_train.numpy(), arrays["x_train"].astype(np.float32))
    np.testing.assert_array_equal(data.y_train.numpy(), arrays["y_train"])
    np.testing.assert_array_equal(data.x_test.numpy(), arrays["x_test"].astype(np.float32))
    np.testing.assert_array_equal(data.y_test.numpy(), arrays["y_test"])
    assert data.x_train.dtype == torch.float32 and data.y_test.dtype == torch.int64
    assert data.fingerprint == load_dataset(f"npz:{path}").fingerprint
    # npz files are not cached: a change on disk gives a new fingerprint
    arrays["x_test"][0, 0] += 1.0
    np.savez(path, **arrays)
    assert load_dataset(f"npz:{path}").fingerprint != data.fingerprint


def test_npz_integral_float_labels_are_accepted(tmp_path):
    arrays = npz_arrays()
    arrays["y_train"] = arrays["y_train"].astype(np.float64)
    np.savez(tmp_path / "f.npz", **arrays)
    data = load_dataset(f"npz:{tmp_path / 'f.npz'}")
    assert data.y_train.dtype == torch.int64
    np.testing.assert_array_equal(data.y_train.numpy(), arrays["y_train"].astype(np.int64))


def _bad_npz(tmp_path, case):
    arrays = npz_arrays()
    path = tmp_path / f"{case}.npz"
    if case == "missing_key":
        del arrays["y_test"]
    elif case == "float_labels":
        arrays["y_train"] = arrays["y_train"] + 0.5
    elif case == "nan_labels":
        arrays["y_test"] = arrays["y_test"].astype(float)
        arrays["y_test"][2] = np.nan
    elif case == "string_labels":
        arrays["y_train"] = np.array(["cat", "dog"] * 15)
    elif case == "2d_labels":
        arrays["y_train"] = arrays["y_train"].reshape(15, 2)
    elif case == "mismatched_lengths":
        arrays["y_train"] = arrays["y_train"][:-1]
    elif case == "nan_inputs":
        arrays["x_train"][4, 2] = np.nan
    elif case == "inf_inputs":
        arrays["x_test"][1, 0] = np.inf
    elif case == "feature_mismatch":
        arrays["x_test"] = arrays["x_test"][:, :4]
    elif case == "1d_inputs":
        arrays["x_train"], arrays["x_test"] = arrays["x_train"][:, 0], arrays["x_test"][:, 0]
    elif case == "negative_labels":
        arrays["y_test"][0] = -1
    elif case == "empty_test":
        arrays["x_test"], arrays["y_test"] = arrays["x_test"][:0], arrays["y_test"][:0]
    elif case == "not_a_file":
        return tmp_path / "does_not_exist.npz"
    elif case == "directory":
        path.mkdir()
        return path
    elif case == "garbage_bytes":
        path.write_bytes(b"\x00\x01garbage, not a zip archive")
        return path
    elif case == "single_array_npy":
        path = tmp_path / "single.npy"
        np.save(path, arrays["x_train"])
        return path
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case, needle", [
    ("missing_key", "y_test"),
    ("float_labels", "y_train"),
    ("nan_labels", "y_test"),
    ("string_labels", "y_train"),
    ("2d_labels", "y_train"),
    ("mismatched_lengths", "length"),
    ("nan_inputs", "x_train"),
    ("inf_inputs", "x_test"),
    ("feature_mismatch", "shape"),
    ("1d_inputs", "feature"),
    ("negative_labels", "negative"),
    ("empty_test", "empty"),
    ("not_a_file", "does_not_exist.npz"),
    ("directory", "directory.npz"),
    ("garbage_bytes", "garbage_bytes.npz"),
    ("single_array_npy", "single.npy"),
])
def test_npz_bad_input(tmp_path, case, needle):
    path = _bad_npz(tmp_path, case)
    with pytest.raises(DatasetError) as e:
        load_dataset(f"npz:{path}")
    assert_one_line(e.value, needle)
