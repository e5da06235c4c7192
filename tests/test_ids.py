"""Id files (attribution/ids.py): training indices as txt, csv or npy, every bad input a one-line IdsError."""

from __future__ import annotations

import numpy as np
import pytest

from attribution.errors import DmmError
from attribution.ids import IdsError, read_ids

N_TRAIN, N_POINTS = 10, 15  # ids 10..14 are held-out points


def write(tmp_path, name, content):
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("name, content", [
    ("f.txt", "7\n1\n3\n"),
    ("f.txt", "  7 1\n\n3  \n"),
    ("f.csv", "7,1,3\n"),
    ("f.csv", "7, 1\n3,\n"),
    ("f.npy", np.array([7, 1, 3], dtype=np.int64)),
    ("f.npy", np.array([[7, 1, 3]], dtype=np.int32)),
    ("f.npy", np.array([7.0, 1.0, 3.0])),
])
def test_parse(tmp_path, name, content):
    ids = read_ids(write(tmp_path, name, content), N_TRAIN, N_POINTS)
    assert ids.dtype == np.int64
    assert ids.tolist() == [1, 3, 7]


def test_bounds_are_inclusive(tmp_path):
    ids = read_ids(write(tmp_path, "f.txt", f"0 {N_TRAIN - 1}"), N_TRAIN, N_POINTS)
    assert ids.tolist() == [0, N_TRAIN - 1]


def test_errors_are_dmm_errors():
    assert issubclass(IdsError, DmmError)


@pytest.mark.parametrize("name, content, needles", [
    ("out.txt", "1 2 99", ["99", "out of range"]),
    ("out.csv", "1,15", ["15", "out of range"]),
    ("huge.txt", "1e30", ["out of range"]),
    ("out.npy", np.array([3, 10**12]), ["out of range"]),
    ("neg.txt", "3 -1", ["-1", "negative"]),
    ("neg.npy", np.array([-5, 2]), ["-5", "negative"]),
    ("frac.txt", "1 1.5 2", ["1.5", "not an integer"]),
    ("frac.npy", np.array([1.0, 2.5]), ["2.5", "not an integer"]),
    ("word.txt", "1 abc 2", ["'abc'", "not an integer"]),
    ("header.csv", "id\n1\n2\n", ["'id'", "not an integer"]),
    ("nan.txt", "1 nan", ["nan", "not an integer"]),
    ("bool.npy", np.array([True, False]), ["bool"]),
    ("dup.txt", "4 2 4", ["id 4", "2 times"]),
    ("dup2.csv", "1,1,2,2,2", ["id 1", "2 times"]),
    ("dup.npy", np.array([5, 5, 5]), ["id 5", "3 times"]),
    ("empty.txt", "", ["no ids"]),
    ("blank.csv", " \n,\n", ["no ids"]),
    ("empty.npy", np.array([], dtype=np.int64), ["no ids"]),
    ("heldout.txt", "2 12", ["12", "held-out"]),
    ("heldout.npy", np.array([N_TRAIN]), [str(N_TRAIN), "held-out"]),
    ("binary.txt", b"\xff\xfe\x00\x80", ["cannot read"]),
    ("garbage.npy", b"not an npy file", ["cannot read"]),
])
def test_bad_id_file(tmp_path, name, content, needles):
    if name.endswith(".npy") and isinstance(content, bytes):
        (tmp_path / name).write_bytes(content)
        path = tmp_path / name
    else:
        path = write(tmp_path, name, content)
    with pytest.raises(IdsError) as e:
        read_ids(path, N_TRAIN, N_POINTS)
    msg = str(e.value)
    assert "\n" not in msg, repr(msg)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_held_out_needs_n_points(tmp_path):
    # without n_points, an id past the training set is simply out of range
    with pytest.raises(IdsError) as e:
        read_ids(write(tmp_path, "f.txt", "12"), N_TRAIN)
    assert "out of range" in str(e.value) and "held-out" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(IdsError) as e:
        read_ids(tmp_path / "nope.txt", N_TRAIN, N_POINTS)
    msg = str(e.value)
    assert "\n" not in msg and "nope.txt" in msg and "does not exist" in msg


def test_directory_is_not_an_id_file(tmp_path):
    with pytest.raises(IdsError) as e:
        read_ids(tmp_path, N_TRAIN, N_POINTS)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
