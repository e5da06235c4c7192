"""User data files, read into float32 inputs x and integer labels y: `npz:PATH` and `npy:DIR`.

`npz:PATH`: one .npz with x_train, y_train, x_test, y_test. `npy:DIR`: a directory of numbered shards
x_train_000.npy, x_train_001.npy, ... and likewise y_train_*, x_test_*, y_test_* (numbers 0, 1, 2, ...
without gaps, zero-padding optional; x shard i pairs with y shard i), memory-mapped read-only.

Numeric inputs other than uint8 are cast to float32 as they are. uint8 inputs are images: (N, H, W) (one
channel), (N, C, H, W) or (N, H, W, C); the channel axis is the `layout` entry ("NCHW" or "NHWC": a `layout`
key in the .npz, `layout.npy` in the directory) or else whichever of axes 1 and 3 has at most 4 entries.
They become (N, C, H, W) float32 x̂ = (x/255 − μ_c)/σ_c, with μ_c, σ_c the mean and population standard
deviation of x_train/255 in channel c, computed exactly from pixel counts and rounded to float32 (σ_c = 1
where a channel is constant); x_test uses x_train's μ, σ. The float32 output is preallocated and filled
`CHUNK_ELEMENTS` at a time, so no second float copy is ever held.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from .errors import DmmError


class DatasetError(DmmError):
    """A dataset name or file that cannot be loaded; the message names the fix."""


KEYS = ("x_train", "y_train", "x_test", "y_test")
LAYOUTS = ("NCHW", "NHWC")
CHUNK_ELEMENTS = 1 << 18  # input elements converted per step
SHARD = re.compile(r"(x_train|y_train|x_test|y_test)_(\d+)\.npy")
SHARD_NAMING = "x_train_000.npy, y_train_000.npy, x_test_000.npy, y_test_000.npy, ... (numbered from 0)"


def _chunks(shards):
    """(first row, rows) over the shards, at most CHUNK_ELEMENTS elements (one row at least) per piece."""
    start = 0
    for shard in shards:
        step = max(1, CHUNK_ELEMENTS // max(1, math.prod(shard.shape[1:])))
        for i in range(0, len(shard), step):
            yield start + i, shard[i:i + step]
        start += len(shard)


def channel_table(mean, std) -> np.ndarray:
    """(C, 256) float32 table of (v/255 − mean_c)/std_c, in float32 arithmetic, for v = 0..255."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return (np.arange(256, dtype=np.float32) / 255.0 - mean[:, None]) / std[:, None]


def channel_stats(shards, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """μ_c and σ_c (population) of x/255 per channel from exact pixel counts, rounded to float32."""
    axis = 1 if layout == "NCHW" else -1
    counts = np.zeros((shards[0].shape[axis], 256), dtype=np.int64)
    for _, piece in _chunks(shards):
        for c in range(len(counts)):
            counts[c] += np.bincount(np.take(piece, c, axis=axis).ravel(), minlength=256)
    mean, std = [], []
    for row in counts.tolist():
        n = sum(row)
        s1 = sum(k * v for v, k in enumerate(row))
        s2 = sum(k * v * v for v, k in enumerate(row))
        mean.append(s1 / (255 * n))  # exact integers, one correctly rounded division
        var = (n * s2 - s1 * s1) / (255 * 255 * n * n)
        std.append(math.sqrt(var) if var > 0 else 1.0)
    return np.array(mean, np.float32), np.array(std, np.float32)


def images_to_float(shards, layout: str, table: np.ndarray) -> np.ndarray:
    """uint8 image shards in `layout` as one preallocated (N, C, H, W) float32 array, via `table`."""
    d0, d1, d2 = shards[0].shape[1:]
    out = np.empty((sum(len(s) for s in shards), *((d0, d1, d2) if layout == "NCHW" else (d2, d0, d1))),
                   dtype=np.float32)
    axis = 1 if layout == "NCHW" else -1
    for start, piece in _chunks(shards):
        for c in range(len(table)):  # mode="clip" writes straight into out (uint8 indices are in range)
            np.take(table[c], np.take(piece, c, axis=axis), out=out[start:start + len(piece), c], mode="clip")
    return out


def numbers_to_float(shards) -> np.ndarray:
    """Numeric shards cast to float32 into one preallocated array (one float32 array in memory: itself)."""
    if len(shards) == 1 and shards[0].dtype == np.float32 and not isinstance(shards[0], np.memmap):
        return shards[0]
    out = np.empty((sum(len(s) for s in shards), *shards[0].shape[1:]), dtype=np.float32)
    for start, piece in _chunks(shards):
        out[start:start + len(piece)] = piece
    return out


def image_layout(label: str, shape: tuple[int, ...], given) -> str:
    """"NCHW" or "NHWC" for uint8 points of `shape` (after the N axis), from `given` or the channel count."""
    if len(shape) not in (2, 3):
        raise DatasetError(f"{label}: uint8 inputs are images, but a point has shape {shape}; give (N, H, W), "
                           "(N, C, H, W) or (N, H, W, C) images, or float inputs")
    if given is not None:
        value = str(given[()]) if given.ndim == 0 and given.dtype.kind == "U" else None
        if value not in LAYOUTS or len(shape) == 2:
            shown = repr(value) if value else f"a {given.dtype} array of shape {given.shape}"
            raise DatasetError(f"{label}: layout is {shown} for points of shape {shape}; give the string 'NCHW' "
                               "or 'NHWC' for (N, C, H, W) or (N, H, W, C) images, none for (N, H, W)")
        return value
    if len(shape) == 2:
        return "NCHW"  # (N, H, W) gains a channel axis of 1
    first, last = shape[0] <= 4, shape[2] <= 4
    if first == last:
        raise DatasetError(f"{label}: cannot tell the channel axis of uint8 images of shape {shape}; add a "
                           "layout entry 'NCHW' or 'NHWC'")
    return "NCHW" if first else "NHWC"


def read_inputs(label: str, get, layout=None) -> tuple[np.ndarray, np.ndarray]:
    """x_train, x_test as float32, one split read at a time; `get(key)` gives (name, array) shards."""
    train = get("x_train")
    name0, dtype, point = train[0][0], train[0][1].dtype, train[0][1].shape[1:]
    if train[0][1].ndim == 0 or dtype.kind not in "biuf":
        raise DatasetError(f"{label}: {name0} is not a numeric (points, features...) array; give one")
    images = dtype == np.uint8
    if layout is not None and not images:
        raise DatasetError(f"{label}: a layout is given but the inputs are {dtype}, not uint8 images; "
                           "drop the layout or store the images as uint8")

    def arrays(shards):
        for name, arr in shards:
            if arr.ndim == 0 or arr.dtype != dtype or arr.shape[1:] != point:
                raise DatasetError(f"{label}: {name} holds {arr.dtype} points of shape {arr.shape[1:]} but {name0} "
                                   f"holds {dtype} {point}; give every input shard of both splits one per-point "
                                   "shape and dtype")
        return [arr[:, None] if images and arr.ndim == 3 else arr for _, arr in shards]  # (N, H, W): one channel

    if not images:
        return numbers_to_float(arrays(train)), numbers_to_float(arrays(get("x_test")))
    order = image_layout(label, point, layout)
    shards = arrays(train)
    table = channel_table(*channel_stats(shards, order))
    x_train = images_to_float(shards, order, table)
    del shards, train  # the uint8 train images go before the test images are read
    return x_train, images_to_float(arrays(get("x_test")), order, table)


def check_labels(label: str, key: str, y: np.ndarray) -> np.ndarray:
    """`y` if it is a 1-D array of integral class ids (integer or integral float dtype)."""
    if y.ndim != 1 or y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(np.mod(y, 1) == 0)):
        raise DatasetError(f"{label}: {key} must be a 1-D array of integer class ids")
    return y


def read_npz(path: str) -> dict[str, np.ndarray]:
    """The four arrays of `npz:PATH` (read only, never unpickled), inputs as float32."""
    label = f"npz:{path}"
    if not Path(path).is_file():
        raise DatasetError(f"{label} is not a file; give the path of an .npz written by numpy.savez")
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise DatasetError(f"{label} is a single array, not an .npz archive; save x_train, "
                               "y_train, x_test, y_test with numpy.savez")
        with f:
            missing = [k for k in KEYS if k not in f.files]
            if missing:
                raise DatasetError(f"{label} lacks {', '.join(missing)}; save x_train, y_train, x_test, y_test")
            out = {k: check_labels(label, k, f[k]) for k in ("y_train", "y_test")}
            layout = f["layout"] if "layout" in f.files else None
            out["x_train"], out["x_test"] = read_inputs(label, lambda k: [(k, f[k])], layout)
    except DatasetError:
        raise
    except (OSError, ValueError) as e:
        raise DatasetError(f"{label} cannot be read ({e}); give an .npz written by numpy.savez") from None
    return out


def _open(label: str, path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{label}: {path.name} cannot be read ({e}); write it with numpy.save") from None


def _shard_files(label: str, root: Path) -> dict[str, list[Path]]:
    found: dict[str, dict[int, Path]] = {k: {} for k in KEYS}
    for entry in sorted(root.iterdir()):
        m = SHARD.fullmatch(entry.name)
        if m:
            i = int(m[2])
            if i in found[m[1]]:
                raise DatasetError(f"{label}: {found[m[1]][i].name} and {entry.name} are both shard {i} of "
                                   f"{m[1]}; keep one")
            found[m[1]][i] = entry
    for key, shards in found.items():
        if not shards:
            raise DatasetError(f"{label} has no {key}_*.npy shards; write {SHARD_NAMING}")
        gap = next((i for i in range(len(shards)) if i not in shards), None)  # none: exactly 0..len-1
        if gap is not None:
            raise DatasetError(f"{label}: {key} shard {gap} is missing (shards number 0, 1, 2, ... without "
                               "gaps); add it or renumber")
    return {key: [shards[i] for i in range(len(shards))] for key, shards in found.items()}


def read_npy_dir(path: str) -> dict[str, np.ndarray]:
    """The four arrays of `npy:DIR` (shards memory-mapped read-only), inputs as float32."""
    label, root = f"npy:{path}", Path(path)
    if not root.is_dir():
        raise DatasetError(f"{label} is not a directory; give a directory of shards {SHARD_NAMING}")
    files = _shard_files(label, root)
    out = {}
    for split in ("train", "test"):
        xs, ys = files[f"x_{split}"], files[f"y_{split}"]
        if len(xs) != len(ys):
            raise DatasetError(f"{label}: {len(xs)} x_{split} shards but {len(ys)} y_{split} shards; write one "
                               "y shard per x shard")
        y = [check_labels(label, p.name, _open(label, p)) for p in ys]
        for x_file, y_file, labels in zip(xs, ys, y):
            x = _open(label, x_file)
            if x.ndim == 0 or len(x) != len(labels):
                raise DatasetError(f"{label}: {x_file.name} has {len(x) if x.ndim else 0} points but {y_file.name} "
                                   f"has {len(labels)} labels; give each shard pair one label per point")
        out[f"y_{split}"] = np.concatenate(y)
    layout = _open(label, root / "layout.npy") if (root / "layout.npy").is_file() else None
    out["x_train"], out["x_test"] = read_inputs(label, lambda k: [(p.name, _open(label, p)) for p in files[k]],
                                                layout)
    return out
