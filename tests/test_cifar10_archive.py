"""CIFAR-10 from its official python archive (attribution/datasets.py), on a tiny archive the tests generate:
reading, the registry, download and checksum, and every malformed archive refused in one line."""

from __future__ import annotations

import hashlib
import io
import pickle
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
    load_dataset,
    read_cifar10_archive,
)
from test_datasets import assert_one_line


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
