"""Dataset registry (attribution/datasets.py): digits, mnist1d, cifar10 (tiny generated archive), npz:PATH.

uint8 images in npz:PATH and npy:DIR shards: tests/test_dataset_files.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from attribution.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DatasetError,
    cifar10_archive,
    fingerprint_arrays,
    load_dataset,
    load_digits_dataset,
    make_dataset,
    read_cifar10_archive,
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


# ---------------------------------------------------------------- cifar10 (tiny archive, official format)

BATCH = 4  # rows per batch in the tiny archive
BATCH_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def tiny_batches(seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    return {name: {b"batch_label": name.encode(),
                   b"labels": [int(v) for v in rng.integers(0, 10, BATCH)],
                   b"data": rng.integers(0, 256, (BATCH, 3072), dtype=np.uint8),
                   b"filenames": [f"{name}_{i}.png".encode() for i in range(BATCH)]}
            for name in BATCH_NAMES}


def write_archive(path: Path, batches: dict[str, object], raw: dict[str, bytes] | None = None) -> Path:
    """A .tar.gz holding cifar-10-batches-py/<name> for each pickled batch (or raw bytes)."""
    members = {name: pickle.dumps(d, protocol=2) for name, d in batches.items()}
    members.update(raw or {})
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def test_read_tiny_cifar10_archive(tmp_path):
    batches = tiny_batches()
    data = read_cifar10_archive(write_archive(tmp_path / "cifar-10-python.tar.gz", batches))
    assert data.name == "cifar10" and data.num_classes == 10
    assert data.x_train.shape == (5 * BATCH, 3, 32, 32) and data.x_test.shape == (BATCH, 3, 32, 32)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64

    train_labels = sum((batches[n][b"labels"] for n in BATCH_NAMES[:5]), [])
    assert data.y_train.tolist() == train_labels
    assert data.y_test.tolist() == batches["test_batch"][b"labels"]

    # rows are channel-major (R plane, G plane, B plane), scaled to [0, 1] and normalised per channel
    raw = np.concatenate([batches[n][b"data"] for n in BATCH_NAMES[:5]]).reshape(-1, 3, 32, 32)
    expect = (raw / 255.0 - CIFAR10_MEAN[:, None, None]) / CIFAR10_STD[:, None, None]
    np.testing.assert_allclose(data.x_train.numpy(), expect, rtol=1e-5, atol=1e-5)
    assert data.x_train[1, 2, 3, 4].item() == pytest.approx(
        (batches["data_batch_1"][b"data"][1, 2 * 1024 + 3 * 32 + 4] / 255.0 - 0.4465) / 0.2616, abs=1e-5)
    raw_te = batches["test_batch"][b"data"].reshape(-1, 3, 32, 32)
    np.testing.assert_allclose(data.x_test.numpy(),
                               (raw_te / 255.0 - CIFAR10_MEAN[:, None, None]) / CIFAR10_STD[:, None, None],
                               rtol=1e-5, atol=1e-5)


def test_generated_archive_loads_through_the_registry(tmp_path, monkeypatch):
    # the registry's own path: $DMM_DATA, md5 check, parse, chunked normalisation; no download
    from attribution import dataset_files, datasets

    batches = tiny_batches(seed=3)
    path = write_archive(tmp_path / "cifar-10-python.tar.gz", batches)
    monkeypatch.setenv("DMM_DATA", str(tmp_path))
    monkeypatch.setattr(datasets, "CIFAR10_MD5", hashlib.md5(path.read_bytes()).hexdigest())
    monkeypatch.setattr(datasets, "_LOADED", {})
    monkeypatch.setattr(datasets.urllib.request, "urlretrieve", lambda *a: pytest.fail("downloaded"))
    monkeypatch.setattr(dataset_files, "CHUNK_ELEMENTS", 3 * 3072)  # 3 images a step: each batch of 4 takes 2
    data = load_dataset("cifar10", download=True)
    assert data.name == "cifar10" and data.x_train.shape == (5 * BATCH, 3, 32, 32)

    def normalise(rows):  # the formula in float32, as before the chunked conversion: same bits
        x = np.concatenate(rows).reshape(-1, 3, 32, 32).astype(np.float32)
        return (x / 255.0 - CIFAR10_MEAN[:, None, None]) / CIFAR10_STD[:, None, None]
    x_tr = normalise([batches[n][b"data"] for n in BATCH_NAMES[:5]])
    x_te = normalise([batches["test_batch"][b"data"]])
    np.testing.assert_array_equal(data.x_train.numpy(), x_tr)
    np.testing.assert_array_equal(data.x_test.numpy(), x_te)
    y_tr = np.array(sum((batches[n][b"labels"] for n in BATCH_NAMES[:5]), []), dtype=np.int64)
    y_te = np.array(batches["test_batch"][b"labels"], dtype=np.int64)
    h = hashlib.sha256()  # the fingerprint's definition, by hand
    for part, arr in zip(("x_train", "y_train", "x_test", "y_test"), (x_tr, y_tr, x_te, y_te)):
        h.update(f"{part}:{arr.dtype.str}:{arr.shape}".encode() + arr.tobytes())
    assert data.fingerprint == h.hexdigest()


def test_cifar10_archive_download_and_checksum(tmp_path):
    src = write_archive(tmp_path / "served.tar.gz", tiny_batches())
    blob = src.read_bytes()
    root = tmp_path / "cache"
    got = cifar10_archive(root, url=src.as_uri(), md5=hashlib.md5(blob).hexdigest(), download=True)
    assert got == root / "cifar-10-python.tar.gz"
    assert got.read_bytes() == blob
    assert not list(root.glob("*.part"))
    assert read_cifar10_archive(got).x_test.shape == (BATCH, 3, 32, 32)
    # a second call finds the verified file and does not download again
    assert cifar10_archive(root, url=(tmp_path / "gone.tar.gz").as_uri(),
                           md5=hashlib.md5(blob).hexdigest()) == got


def test_cifar10_archive_wrong_md5(tmp_path):
    src = write_archive(tmp_path / "served.tar.gz", tiny_batches())
    with pytest.raises(DatasetError) as e:
        cifar10_archive(tmp_path / "cache", url=src.as_uri(), md5="0" * 32, download=True)
    assert_one_line(e.value, "md5")


def test_cifar10_archive_download_failure(tmp_path):
    root = tmp_path / "cache"
    with pytest.raises(DatasetError) as e:
        cifar10_archive(root, url=(tmp_path / "missing.tar.gz").as_uri(), md5=None, download=True)
    assert_one_line(e.value, "download")
    assert list(root.iterdir()) == []


def test_cifar10_registry_verifies_the_official_checksum(tmp_path, monkeypatch):
    # the tiny archive sits where the registry looks; it is not the official file, so md5 fails
    write_archive(tmp_path / "cifar-10-python.tar.gz", tiny_batches())
    monkeypatch.setenv("DMM_DATA", str(tmp_path))
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10")
    assert_one_line(e.value, "md5")


def test_cifar10_is_downloaded_only_when_asked(tmp_path, monkeypatch):
    from attribution import datasets

    served = write_archive(tmp_path / "served.tar.gz", tiny_batches())
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        Path(dest).write_bytes(served.read_bytes())
    monkeypatch.setattr(datasets.urllib.request, "urlretrieve", fake_download)
    monkeypatch.setattr(datasets, "_LOADED", {})
    cache = tmp_path / "cache"
    monkeypatch.setenv("DMM_DATA", str(cache))
    with pytest.raises(DatasetError) as e:
        load_dataset("cifar10")
    assert_one_line(e.value, "no archive", "--dataset cifar10")
    assert calls == [] and not cache.exists()
    with pytest.raises(DatasetError) as e:  # asked: fetched once, then refused for failing the official md5
        load_dataset("cifar10", download=True)
    assert_one_line(e.value, "md5")
    assert calls == [datasets.CIFAR10_URL] and (cache / "cifar-10-python.tar.gz").read_bytes() == served.read_bytes()


def test_cifar10_missing_batch(tmp_path):
    batches = tiny_batches()
    del batches["data_batch_3"]
    with pytest.raises(DatasetError) as e:
        read_cifar10_archive(write_archive(tmp_path / "a.tar.gz", batches))
    assert_one_line(e.value, "data_batch_3")


def test_cifar10_garbage_bytes(tmp_path):
    path = tmp_path / "a.tar.gz"
    path.write_bytes(b"this is not a gzip file at all" * 10)
    with pytest.raises(DatasetError) as e:
        read_cifar10_archive(path)
    assert_one_line(e.value, str(path))


def test_cifar10_malformed_batch(tmp_path):
    batches = tiny_batches()
    with pytest.raises(DatasetError) as e:
        read_cifar10_archive(write_archive(tmp_path / "a.tar.gz", batches, raw={"test_batch": b"\x80garbage"}))
    assert_one_line(e.value, "test_batch", "malformed")
    batches["data_batch_2"][b"data"] = np.zeros((BATCH, 100), dtype=np.uint8)  # not 3×32×32 per row
    with pytest.raises(DatasetError) as e:
        read_cifar10_archive(write_archive(tmp_path / "b.tar.gz", batches))
    assert_one_line(e.value, "data_batch_2")


def test_cifar10_missing_file(tmp_path):
    with pytest.raises(DatasetError) as e:
        read_cifar10_archive(tmp_path / "nope.tar.gz")
    assert_one_line(e.value, "nope.tar.gz")


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
