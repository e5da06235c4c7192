"""Dataset registry: train set S (n points) and held-out set, as float32/int64 tensors.

Every dataset carries a content fingerprint (sha256 over its arrays and split) that the
attribution store records, so a store can never be reused with other data.

Loading never writes user files and touches the network only with `download=True`, which only a
dataset the user named (`--dataset`) gets: a name read from a model sidecar or a store loads what is
already on disk (an `npz:` path is only read, and only if it is a regular file; an `npy:` directory's
shards are only memory-mapped read-only). The file formats are in `dataset_files`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import dataset_files
from .dataset_files import DatasetError, channel_table, images_to_float  # DatasetError: raised by both


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    fingerprint: str

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_points(self) -> int:
        """All evaluation points: train points first, then held-out points."""
        return len(self.y_train) + len(self.y_test)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def all_inputs(self) -> torch.Tensor:
        return torch.cat([self.x_train, self.x_test])

    def all_labels(self) -> torch.Tensor:
        return torch.cat([self.y_train, self.y_test])


class FingerprintMismatch(DatasetError):
    """Data whose fingerprint differs from the one a store or model was built on."""


def check_fingerprint(data: Dataset, fingerprint: str, owner: str) -> None:
    """Refuse ``data`` unless its fingerprint is ``fingerprint``, the one ``owner`` (a store, a model file) records."""
    if data.fingerprint != fingerprint:
        raise FingerprintMismatch(
            f"{owner} was built on other data (fingerprint {str(fingerprint)[:12]}), but {data.name} here has "
            f"{data.fingerprint[:12]}; fix: use the data {owner} was built on, the same files on every node"
        )


def fingerprint_arrays(x_train, y_train, x_test, y_test) -> str:
    """sha256 over shapes, dtypes and bytes of the four arrays (the split is part of it)."""
    h = hashlib.sha256()
    for part, arr in zip(("x_train", "y_train", "x_test", "y_test"), (x_train, y_train, x_test, y_test)):
        arr = np.ascontiguousarray(arr)
        h.update(f"{part}:{arr.dtype.str}:{arr.shape}".encode())
        h.update(arr.data)  # the bytes in place: no copy of a large input
    return h.hexdigest()


def make_dataset(name, x_train, y_train, x_test, y_test, num_classes=None) -> Dataset:
    try:
        x_train, x_test = (np.asarray(a, dtype=np.float32) for a in (x_train, x_test))
        y_train, y_test = (np.asarray(a, dtype=np.int64) for a in (y_train, y_test))
    except (ValueError, TypeError) as e:
        raise DatasetError(f"{name}: arrays are not numeric ({type(e).__name__}); give numeric inputs "
                           "and integer labels") from None
    if x_train.ndim < 2 or x_test.ndim < 2:
        raise DatasetError(f"{name}: inputs must be (points, features...) arrays; add a feature axis")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise DatasetError(f"{name}: inputs and labels differ in length; give one label per input")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"{name}: train and test inputs differ in shape; give both the same per-point shape")
    if len(x_train) == 0 or len(x_test) == 0:
        raise DatasetError(f"{name}: empty train or test split; give at least one point in each")
    for part, arr in (("x_train", x_train), ("x_test", x_test)):
        step = max(1, dataset_files.CHUNK_ELEMENTS // max(1, math.prod(arr.shape[1:])))  # bounded temporaries
        if not all(np.isfinite(arr[i:i + step]).all() for i in range(0, len(arr), step)):
            raise DatasetError(f"{name}: {part} has NaN or infinite values; clean the inputs")
    labels = np.concatenate([y_train, y_test])
    if labels.min() < 0:
        raise DatasetError(f"{name}: negative labels; use class ids 0..k-1")
    k = int(num_classes if num_classes is not None else labels.max() + 1)
    if labels.max() >= k:
        raise DatasetError(f"{name}: label {labels.max()} >= num_classes {k}; use class ids 0..k-1")
    return Dataset(
        name=name,
        x_train=torch.from_numpy(x_train),
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(y_test),
        num_classes=k,
        fingerprint=fingerprint_arrays(x_train, y_train, x_test, y_test),
    )


# scikit-learn's `train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)` of its digits rows, written
# once: the 1437 train rows in order, then the 360 held-out ones (tests/test_datasets.py checks it against scikit-learn)
DIGITS_SPLIT = Path(__file__).with_name("digits_split.npy")
DIGITS_TRAIN = 1437


def _sklearn_digits_csv() -> Path:
    """scikit-learn's bundled digits table (`datasets/data/digits.csv.gz`), found without importing scikit-learn,
    whose import is about 2 s of every process that loads digits (`benchmarks/bench_cli_start.py`)."""
    spec = importlib.util.find_spec("sklearn")
    path = None if spec is None else Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if path is None or not path.is_file():
        raise DatasetError("digits is read from scikit-learn's bundled datasets/data/digits.csv.gz, which is not "
                           "there; pip install scikit-learn")
    return path


def load_digits_dataset() -> Dataset:
    """scikit-learn's digits (1797 8×8 images, pixels 0..16 / 16), its stratified 80/20 split with seed 0."""
    table = np.loadtxt(_sklearn_digits_csv(), delimiter=",")  # a row: 64 pixels, then the label (as `load_digits`)
    x, y = table[:, :-1] / 16.0, table[:, -1].astype(np.int64)
    order = np.load(DIGITS_SPLIT)
    train, test = order[:DIGITS_TRAIN], order[DIGITS_TRAIN:]
    return make_dataset("digits", x[train], y[train], x[test], y[test], num_classes=10)


def load_mnist1d_dataset() -> Dataset:
    """mnist1d generated offline with the package's default arguments (4000 train / 1000 test)."""
    import contextlib
    import io

    from mnist1d.data import get_dataset_args, make_dataset as make_mnist1d

    with contextlib.redirect_stdout(io.StringIO()):
        data = make_mnist1d(get_dataset_args())
    return make_dataset("mnist1d", data["x"], data["y"], data["x_test"], data["y_test"], num_classes=10)


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cifar10_archive(root: Path, url: str = CIFAR10_URL, md5: str | None = CIFAR10_MD5,
                    download: bool = False) -> Path:
    """The official python-format archive under root, checksum-verified; fetched once if `download`."""
    path = root / "cifar-10-python.tar.gz"
    if not path.exists():
        if not download:
            raise DatasetError(f"cifar10: no archive at {path} and no download asked for (a dataset named by a "
                               "model file or store is never downloaded); pass --dataset cifar10 to `dmm train` or "
                               f"`dmm estimate` once (API: download=True), or put {url} there")
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        try:
            urllib.request.urlretrieve(url, tmp)
        except (OSError, ValueError) as e:  # URLError is an OSError
            tmp.unlink(missing_ok=True)
            raise DatasetError(f"cifar10: cannot download {url} ({type(e).__name__}); check the connection "
                               f"or place cifar-10-python.tar.gz in {root}") from None
        tmp.replace(path)
    if md5 is not None and _file_md5(path) != md5:
        raise DatasetError(f"cifar10: {path} fails its md5 check; delete it and download again")
    return path


def read_cifar10_archive(path: Path) -> Dataset:
    """Parse the python-format archive (data_batch_1..5, test_batch; pickled dicts of uint8 rows)."""
    def batch(tar, member):
        try:
            d = pickle.load(tar.extractfile(member), encoding="bytes")
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            return x, np.asarray(d[b"labels"], dtype=np.int64)
        except Exception as e:  # noqa: BLE001 - any parse failure is a malformed archive
            raise DatasetError(f"cifar10: {member.name} in {path} is malformed ({type(e).__name__}); "
                               "use the official cifar-10-python.tar.gz") from None
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
            missing = [n for n in names if n not in members]
            if missing:
                raise DatasetError(f"cifar10: {path} lacks {', '.join(missing)}; use the official "
                                   "cifar-10-python.tar.gz")
            parts = [batch(tar, members[n]) for n in names]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"cifar10: cannot read {path} ({e}); use the official cifar-10-python.tar.gz") from None
    table = channel_table(CIFAR10_MEAN, CIFAR10_STD)  # (x/255 − mean)/std per channel, as float32
    x_tr = images_to_float([p[0] for p in parts[:5]], "NCHW", table)
    y_tr = np.concatenate([p[1] for p in parts[:5]])
    return make_dataset("cifar10", x_tr, y_tr, images_to_float([parts[5][0]], "NCHW", table), parts[5][1],
                        num_classes=10)


def load_cifar10_dataset(download: bool = False) -> Dataset:
    """CIFAR-10 from its archive in $DMM_DATA (default ~/.cache/dmm-pipeline); fetched there if `download`."""
    root = Path(os.environ.get("DMM_DATA", Path.home() / ".cache" / "dmm-pipeline"))
    return read_cifar10_archive(cifar10_archive(root, md5=CIFAR10_MD5, download=download))


def load_npz_dataset(path: str) -> Dataset:
    """User arrays in an .npz file with keys x_train, y_train, x_test, y_test (read only, never pickled)."""
    return make_dataset(f"npz:{path}", **dataset_files.read_npz(path))


def load_npy_dataset(path: str) -> Dataset:
    """User arrays in a directory of numbered .npy shards x_train_000.npy, y_train_000.npy, ... (memory-mapped)."""
    return make_dataset(f"npy:{path}", **dataset_files.read_npy_dir(path))


FILE_FORMATS = {"npz:": load_npz_dataset, "npy:": load_npy_dataset}  # prefix → loader of the path after it


# every loader takes `download`: whether a missing file may be fetched from the network
DATASETS = {
    "digits": lambda download: load_digits_dataset(),  # bundled with scikit-learn
    "mnist1d": lambda download: load_mnist1d_dataset(),  # generated offline
    "cifar10": load_cifar10_dataset,
}


DEFAULT_DATASET = "digits"


def check_dataset_name(name: str) -> None:
    """Refuse a name that is neither registered nor `npz:PATH` / `npy:DIR`, before anything is loaded."""
    if name[:4] not in FILE_FORMATS and name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, npz:PATH or npy:DIR")


def load_dataset(name: str = DEFAULT_DATASET, download: bool = False) -> Dataset:
    """`digits` (default), `mnist1d`, `cifar10`, `npz:PATH` or `npy:DIR`. Treat the tensors as read-only.

    `download=True` (only for a dataset the user named) lets a missing CIFAR-10 archive be fetched.
    """
    check_dataset_name(name)
    if name[:4] in FILE_FORMATS:  # files are read on every call: they may change on disk
        return FILE_FORMATS[name[:4]](name[4:])
    if name not in _LOADED:
        _LOADED[name] = DATASETS[name](download=download)
    return _LOADED[name]


_LOADED: dict[str, Dataset] = {}  # registered datasets, loaded once per process
