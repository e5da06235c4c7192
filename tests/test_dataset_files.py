"""User data files (attribution/dataset_files.py): uint8 images in `npz:PATH`, `npy:DIR` shards, bounded memory."""

from __future__ import annotations

import json
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from attribution import dataset_files
from attribution.datasets import DatasetError, check_dataset_name, fingerprint_arrays, load_dataset
from attribution.dataset_files import channel_stats
from test_datasets import assert_one_line


def images(n, shape=(3, 8, 6), seed=0):
    """uint8 NCHW images whose channels have different ranges (so per-channel statistics matter)."""
    rng = np.random.default_rng(seed)
    hi = np.array([256, 128, 40][:shape[0]] + [256] * max(0, shape[0] - 3))
    return (rng.integers(0, 1 << 16, (n, *shape)) % hi[None, :, None, None]).astype(np.uint8)


def reference(x_train, x):
    """The straightforward float64 normalisation: (x/255 − μ_c)/σ_c with x_train's per-channel μ, σ."""
    t = x_train / 255.0
    mean, std = t.mean(axis=(0, 2, 3)), t.std(axis=(0, 2, 3))
    return (x / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]


def labels(n, k=4, seed=1):
    return np.random.default_rng(seed).integers(0, k, n)


def nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def write_shards(root: Path, key: str, parts) -> None:
    root.mkdir(exist_ok=True)
    for i, part in enumerate(parts):
        np.save(root / f"{key}_{i:03d}.npy", part)


def split(arr, sizes):
    return np.split(arr, np.cumsum(sizes)[:-1])


@pytest.fixture
def arrays():
    return dict(x_train=images(20), y_train=labels(20), x_test=images(6, seed=2), y_test=labels(6, seed=3))


# ---------------------------------------------------------------- uint8 npz

def test_uint8_npz_is_normalised_with_the_train_statistics(tmp_path, arrays):
    np.savez(tmp_path / "nchw.npz", **arrays)
    np.savez(tmp_path / "nhwc.npz", **{**arrays, "x_train": nhwc(arrays["x_train"]), "x_test": nhwc(arrays["x_test"])})
    a, b = load_dataset(f"npz:{tmp_path / 'nchw.npz'}"), load_dataset(f"npz:{tmp_path / 'nhwc.npz'}")
    assert a.x_train.dtype == torch.float32 and a.input_shape == b.input_shape == (3, 8, 6)
    np.testing.assert_allclose(a.x_train.numpy(), reference(arrays["x_train"], arrays["x_train"]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.x_test.numpy(), reference(arrays["x_train"], arrays["x_test"]), rtol=0, atol=1e-6)
    # the train set is standardised per channel; the test set is not (it uses the train statistics)
    np.testing.assert_allclose(a.x_train.numpy().mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(a.x_train.numpy().std(axis=(0, 2, 3)), 1, atol=1e-5)
    assert abs(a.x_test.numpy().mean(axis=(0, 2, 3))).max() > 1e-3
    # both layouts give the same (N, C, H, W) tensors, bit for bit, and one fingerprint
    for t in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, t), getattr(b, t))
    assert a.fingerprint == b.fingerprint and a.name != b.name


def test_grey_images_gain_a_channel_axis(tmp_path, arrays):
    x_tr, x_te = arrays["x_train"][:, 0], arrays["x_test"][:, 0]  # (N, H, W)
    np.savez(tmp_path / "g.npz", **{**arrays, "x_train": x_tr, "x_test": x_te})
    data = load_dataset(f"npz:{tmp_path / 'g.npz'}")
    assert data.input_shape == (1, 8, 6)
    np.testing.assert_allclose(data.x_test.numpy(), reference(x_tr[:, None], x_te[:, None]), rtol=0, atol=1e-6)


def test_layout_entry_decides_an_ambiguous_channel_axis(tmp_path):
    x_tr, x_te = images(12, (3, 4, 4)), images(4, (3, 4, 4), seed=5)  # axes 1 and 3 both look like channels
    base = dict(x_train=x_tr, y_train=labels(12), x_test=x_te, y_test=labels(4))
    np.savez(tmp_path / "a.npz", **base)
    with pytest.raises(DatasetError) as e:
        load_dataset(f"npz:{tmp_path / 'a.npz'}")
    assert_one_line(e.value, "channel axis", "layout", "NCHW")
    np.savez(tmp_path / "c.npz", **base, layout="NCHW")
    np.testing.assert_allclose(load_dataset(f"npz:{tmp_path / 'c.npz'}").x_test.numpy(), reference(x_tr, x_te),
                               rtol=0, atol=1e-6)
    np.savez(tmp_path / "l.npz", **base, layout="NHWC")  # the same bytes read channels-last: 4 channels of 3×4
    last = load_dataset(f"npz:{tmp_path / 'l.npz'}")
    assert last.input_shape == (4, 3, 4)
    as_nchw = lambda x: x.transpose(0, 3, 1, 2)  # noqa: E731
    np.testing.assert_allclose(last.x_test.numpy(), reference(as_nchw(x_tr), as_nchw(x_te)), rtol=0, atol=1e-6)


def test_constant_channel_is_only_centred(tmp_path, arrays):
    arrays["x_train"][:, 1] = 200
    arrays["x_test"][:, 1, 0, 0] = 251
    np.savez(tmp_path / "k.npz", **arrays)
    data = load_dataset(f"npz:{tmp_path / 'k.npz'}")
    assert float(abs(data.x_train[:, 1]).max()) == 0.0
    assert data.x_test[0, 1, 0, 0].item() == pytest.approx(51 / 255, abs=1e-6)  # σ = 1 for a constant channel


def test_channel_statistics_are_exact(arrays, monkeypatch):
    x = arrays["x_train"]
    mean, std = channel_stats([x], "NCHW")
    for c in range(3):  # exact rationals, rounded once
        v = [int(p) for p in x[:, c].ravel()]
        m = Fraction(sum(v), 255 * len(v))
        var = sum((Fraction(p, 255) - m) ** 2 for p in v) / len(v)
        assert mean[c] == np.float32(float(m)) and std[c] == np.float32(np.sqrt(float(var)))
    # so they (and the fingerprint) do not depend on the order of the points or on the chunking
    monkeypatch.setattr(dataset_files, "CHUNK_ELEMENTS", 5)
    shuffled = x[np.random.default_rng(0).permutation(len(x))]
    again = channel_stats([shuffled[:7], shuffled[7:]], "NCHW")
    assert np.array_equal(again[0], mean) and np.array_equal(again[1], std)


@pytest.mark.parametrize("case, needles", [
    ("bad_layout", ("layout", "'CHW'")),
    ("layout_array", ("layout", "array of shape (2,)")),
    ("layout_on_floats", ("layout", "float64")),
    ("layout_on_grey", ("layout", "(N, H, W)")),
    ("uint8_vectors", ("images", "(5,)")),
    ("test_floats", ("x_test", "float64", "uint8")),
])
def test_uint8_npz_bad_input(tmp_path, arrays, case, needles):
    if case == "bad_layout":
        arrays["layout"] = "CHW"
    elif case == "layout_array":
        arrays["layout"] = np.array(["NCHW", "NHWC"])
    elif case == "layout_on_floats":
        arrays.update(x_train=arrays["x_train"] / 255.0, x_test=arrays["x_test"] / 255.0, layout="NCHW")
    elif case == "layout_on_grey":
        arrays.update(x_train=arrays["x_train"][:, 0], x_test=arrays["x_test"][:, 0], layout="NCHW")
    elif case == "uint8_vectors":
        arrays.update(x_train=arrays["x_train"][:, 0, 0, :5], x_test=arrays["x_test"][:, 0, 0, :5])
    elif case == "test_floats":
        arrays["x_test"] = arrays["x_test"] / 255.0
    path = tmp_path / f"{case}.npz"
    np.savez(path, **arrays)
    before = path.read_bytes()
    with pytest.raises(DatasetError) as e:
        load_dataset(f"npz:{path}")
    assert_one_line(e.value, f"npz:{path}", *needles)
    assert path.read_bytes() == before


# ---------------------------------------------------------------- npy:DIR shards

def write_dir(root: Path, arrays, train_sizes=(7, 0, 13), test_sizes=(6,)) -> Path:
    for key, sizes in (("train", train_sizes), ("test", test_sizes)):
        write_shards(root, f"x_{key}", split(arrays[f"x_{key}"], sizes))
        write_shards(root, f"y_{key}", split(arrays[f"y_{key}"], sizes))
    return root


@pytest.mark.parametrize("kind", ["uint8_nchw", "uint8_nhwc", "float64"])
def test_npy_shards_equal_the_npz_of_their_concatenation(tmp_path, arrays, kind):
    if kind == "uint8_nhwc":
        arrays.update(x_train=nhwc(arrays["x_train"]), x_test=nhwc(arrays["x_test"]))
    elif kind == "float64":
        arrays.update(x_train=arrays["x_train"] / 7.0, x_test=arrays["x_test"] / 7.0)
    root = write_dir(tmp_path / "shards", arrays)
    (root / "README.txt").write_text("not a shard")  # other files are ignored
    np.savez(tmp_path / "all.npz", **arrays)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    shards, whole = load_dataset(f"npy:{root}"), load_dataset(f"npz:{tmp_path / 'all.npz'}")
    assert shards.name == f"npy:{root}" and shards.n_train == 20 and shards.n_points == 26
    for t in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(shards, t), getattr(whole, t)), t
    assert shards.fingerprint == whole.fingerprint
    if kind == "float64":
        np.testing.assert_array_equal(shards.x_train.numpy(), arrays["x_train"].astype(np.float32))
    else:
        assert shards.input_shape == (3, 8, 6)
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before  # read only


def test_chunk_size_does_not_change_the_data(tmp_path, arrays, monkeypatch):
    root = write_dir(tmp_path / "shards", arrays)
    np.savez(tmp_path / "all.npz", **arrays)
    default = [load_dataset(f"npy:{root}"), load_dataset(f"npz:{tmp_path / 'all.npz'}")]
    monkeypatch.setattr(dataset_files, "CHUNK_ELEMENTS", 5)  # one image (144 values) per step
    small = [load_dataset(f"npy:{root}"), load_dataset(f"npz:{tmp_path / 'all.npz'}")]
    for a, b in zip(default, small):
        assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
        assert a.fingerprint == b.fingerprint == fingerprint_arrays(
            b.x_train.numpy(), b.y_train.numpy(), b.x_test.numpy(), b.y_test.numpy())


def _bad_dir(root: Path, arrays, case) -> str:
    write_dir(root, arrays, train_sizes=(7, 13))
    if case == "not_a_directory":
        root = root / "x_train_000.npy"
    elif case == "missing_split":
        for p in root.glob("x_test_*.npy"):
            p.unlink()
    elif case == "gap":
        (root / "x_train_001.npy").rename(root / "x_train_002.npy")
    elif case == "duplicate":
        np.save(root / "x_train_1.npy", arrays["x_train"][7:])
    elif case == "count_mismatch":
        (root / "y_train_001.npy").unlink()
        np.save(root / "y_train_000.npy", arrays["y_train"])
    elif case == "length_mismatch":
        np.save(root / "y_train_001.npy", arrays["y_train"][7:19])
    elif case == "mixed_shapes":
        np.save(root / "x_train_001.npy", arrays["x_train"][7:, :, :, :4])
    elif case == "mixed_dtypes":
        np.save(root / "x_train_001.npy", arrays["x_train"][7:].astype(np.float32))
    elif case == "test_shape":
        np.save(root / "x_test_000.npy", arrays["x_test"][:, :2])
    elif case == "garbage":
        (root / "x_train_000.npy").write_bytes(b"\x00garbage, not an npy file")
    elif case == "pickled":
        np.save(root / "x_train_000.npy", np.array([{"a": 1}] * 7, dtype=object), allow_pickle=True)
    elif case == "2d_labels":
        np.save(root / "y_test_000.npy", arrays["y_test"].reshape(3, 2))
    elif case == "bad_layout":
        np.save(root / "layout.npy", np.array("HWC"))
    return str(root)


@pytest.mark.parametrize("case, needles", [
    ("not_a_directory", ("not a directory", "x_train_000.npy")),
    ("missing_split", ("x_test_*.npy",)),
    ("gap", ("x_train shard 1 is missing",)),
    ("duplicate", ("x_train_001.npy", "x_train_1.npy", "shard 1")),
    ("count_mismatch", ("2 x_train shards but 1 y_train",)),
    ("length_mismatch", ("x_train_001.npy has 13 points", "y_train_001.npy has 12 labels")),
    ("mixed_shapes", ("x_train_001.npy", "shape (3, 8, 4)", "x_train_000.npy")),
    ("mixed_dtypes", ("x_train_001.npy", "float32", "uint8")),
    ("test_shape", ("x_test_000.npy", "shape (2, 8, 6)")),
    ("garbage", ("x_train_000.npy", "cannot be read")),
    ("pickled", ("x_train_000.npy", "cannot be read")),
    ("2d_labels", ("y_test_000.npy", "1-D")),
    ("bad_layout", ("layout", "'HWC'")),
])
def test_npy_dir_bad_input(tmp_path, arrays, case, needles):
    path = _bad_dir(tmp_path / "d", arrays, case)
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    with pytest.raises(DatasetError) as e:
        load_dataset(f"npy:{path}")
    assert_one_line(e.value, f"npy:{path}", *needles)
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before


def test_npy_name_round_trips_through_a_model_file(tmp_path, arrays):
    from cluster.cli import main

    check_dataset_name("npy:/any/dir")
    with pytest.raises(DatasetError) as e:
        check_dataset_name("npy/x")
    assert_one_line(e.value, "npy:DIR", "npz:PATH")
    root = write_dir(tmp_path / "shards", arrays)
    model = tmp_path / "m.safetensors"
    assert main(["train", "--dataset", f"npy:{root}", "--model", "mlp", "--recipe", "digits-mlp", "--epochs", "1",
                 "--out", str(model)]) == 0
    meta = json.loads(Path(str(model) + ".json").read_text())
    assert meta["dataset"] == f"npy:{root}" and meta["fingerprint"] == load_dataset(f"npy:{root}").fingerprint
    logits = tmp_path / "logits.npy"  # `dmm predict` loads the data by the name in the sidecar
    assert main(["predict", "--model", str(model), "--out", str(logits)]) == 0
    assert np.load(logits).shape == (26, 4)


# ---------------------------------------------------------------- memory: never two float copies

def peak_float_copies(load) -> float:
    """Peak traced allocation while loading, in units of the loaded float32 inputs' size."""
    tracemalloc.start()
    try:
        data = load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak / (data.x_train.numpy().nbytes + data.x_test.numpy().nbytes)


@pytest.mark.parametrize("fmt", ["npz", "npy", "npz-float32"])
def test_loading_holds_one_float_copy(tmp_path, fmt):
    x_tr, x_te = nhwc(images(3000, (3, 32, 32))), nhwc(images(1000, (3, 32, 32), seed=4))
    arrays = dict(x_train=x_tr, y_train=labels(3000), x_test=x_te, y_test=labels(1000))
    if fmt == "npz-float32":  # float32 inputs are used as read, not copied
        arrays.update(x_train=x_tr.astype(np.float32), x_test=x_te.astype(np.float32))
    if fmt.startswith("npz"):
        np.savez(tmp_path / "big.npz", **arrays)
        name = f"npz:{tmp_path / 'big.npz'}"
    else:
        name = f"npy:{write_dir(tmp_path / 'big', arrays, train_sizes=(1000, 2000), test_sizes=(1000,))}"
    # a float copy of the inputs is 49 MB; uint8 images are a quarter of that, converted a chunk at a time
    assert peak_float_copies(lambda: load_dataset(name)) < 1.3
