"""Fit groups: ``datamodels/`` and ``trak/``, the β matrices of one store, written per target chunk.

A group holds weight β_{i,x,c} (n_train × n_points × k), bias β0, the chosen λ, the LDS per
(x, c) and per margin, and one ``done`` marker per target chunk, set after that chunk's data.
Once every chunk is done the driver writes ``weight_rows``, β again one object per training row, which
requests read (:mod:`attribution.row_copy`).
Its attrs ``target_chunk``, ``row_chunk`` and ``config`` key a resumable fit: reopening it with
other values is a ``StoreMismatch`` unless the caller asks to refit. So does its targets spec: a group
fitted for a target subset T (:mod:`attribution.target_subset`) has one β column per fitted target
(n_train × |T| × k) and records the spec and ``target_ids``; everything here works on those columns.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import zarr

from .store_spec import SCHEMA_VERSION, StoreError, StoreMismatch, norm_json, short_value, spec_diff
from .row_copy import ROW_CODECS, ROWS, decoded_rows, drop_row_copy
from .store_zarr import ARRAY_CONFIG, COMPRESSORS, array_attrs, delete_dir, get_array
from .target_subset import IDS, Targets, group_targets

if TYPE_CHECKING:
    from .class_removal import ClassRemoval
    from .store import AttributionStore

FIT_PREFIXES = ("datamodels", "trak")
DELETION_SCALE = "deletion_scale"  # the group attr `dmm calibrate` writes (attribution/deletion_scale.py)
SIZE_EFFECT = "size_effect"        # and the array of n·γ'_x it writes beside it when it trained full-data models
FORGET_SPREAD = "forget_spread"    # and the array of s_x (attribution/forget_spread.py)
CLASS_ARRAYS = {"shift": ("class_shift", "Δ_c: the mean logits' shift when all of class c leaves S (C × |T| × k)"),
                "spread": ("class_spread", "s^c_x: x's extra margin sd when all of its class leaves S"),
                "labels": ("class_labels", "y_x: the training labels that define each class")}
ROW_BATCH = 256  # rows summed per read, bounding memory at ROW_BATCH × n_points × k


def _check_prefix(prefix: str) -> None:
    if prefix not in FIT_PREFIXES:
        raise StoreError(f"fit group prefix must be one of {FIT_PREFIXES}, got {prefix!r}; fix: use one of them")


def fit_group_attrs(store: "AttributionStore", prefix: str) -> dict | None:
    """The attrs of the store's ``prefix`` group, or None if there is none."""
    node = store.group.get(prefix)
    if node is None or not isinstance(node, zarr.Group):
        return None
    return dict(node.attrs)


def recorded_settings(attrs: dict) -> dict:
    """The settings a fit group was started with, from its attrs: ``target_chunk``, ``row_chunk`` and its config."""
    return {"target_chunk": attrs["target_chunk"], "row_chunk": attrs["row_chunk"], **attrs.get("config", {})}


def open_fit_group(store: "AttributionStore", prefix: str) -> "FitGroup":
    """Open an existing ``datamodels``/``trak`` group (StoreError if absent)."""
    _check_prefix(prefix)
    attrs = fit_group_attrs(store, prefix)
    if attrs is None:
        raise StoreError(f"no {prefix} group in store {store.url}; fix: run the fit stage first")
    return FitGroup(store, prefix, attrs)


def refuse_other_settings(store: "AttributionStore", prefix: str, settings: dict, fix: str,
                          targets: Targets = Targets()) -> None:
    """Before anything is written: refuse to resume a ``prefix`` group fitted with other settings, naming each.

    ``settings`` holds ``target_chunk`` and ``row_chunk`` (compared as :func:`create_fit_group` clips them)
    and the config entries; ``targets`` the fit's targets; ``fix`` ends the one-line error (how to resume or
    start over).
    """
    attrs = fit_group_attrs(store, prefix)
    if attrs is None:
        return
    s = store.spec
    clipped = {"target_chunk": min(settings["target_chunk"], targets.count(s.n_points)),
               "row_chunk": min(settings["row_chunk"], s.n_train)}
    have = recorded_settings(attrs)
    want = norm_json({**settings, **clipped}, f"{prefix} settings")
    diff = [f"{k}={short_value(have.get(k))} (now {short_value(v)})" for k, v in want.items() if have.get(k) != v]
    diff += _targets_diff(store, prefix, attrs, targets)
    if diff:
        raise StoreMismatch(f"{prefix}/ in {store.url} was fitted with other settings: {', '.join(diff)}; fix: {fix}")


def _targets_diff(store: "AttributionStore", prefix: str, attrs: dict, targets: Targets) -> list[str]:
    """``targets=...`` when the group's targets (spec, then ids: an ids file may have changed) are not ``targets``."""
    have = group_targets(attrs, lambda: store.zarr_array(f"{prefix}/{IDS}")[:])
    if have.spec == targets.spec and (not have.is_subset or np.array_equal(have.ids, targets.ids)):
        return []
    same = " with other ids" if have.spec == targets.spec else ""
    return [f"targets={have.spec!r}{same} (now {targets.spec!r})"]


def create_fit_group(
    store: "AttributionStore",
    prefix: str,
    target_chunk: int,
    row_chunk: int,
    config: dict | None = None,
    overwrite: bool = False,
    targets: Targets = Targets(),
) -> "FitGroup":
    """Create (or reopen, if identical) the ``datamodels``/``trak`` group of ``store`` for ``targets``.

    An existing group with a different target_chunk/row_chunk/config/targets raises
    ``StoreMismatch`` unless ``overwrite=True``, which deletes it first.
    """
    store._require_writable()
    _check_prefix(prefix)
    s = store.spec
    for name, v in (("target_chunk", target_chunk), ("row_chunk", row_chunk)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise StoreError(f"{name} must be a positive int, got {v!r}; fix: pass e.g. 256")
    p = targets.count(s.n_points)
    tc, rc = min(int(target_chunk), p), min(int(row_chunk), s.n_train)
    config = norm_json(config or {}, f"{prefix} config")
    want = {"target_chunk": tc, "row_chunk": rc, "config": config}
    existing = fit_group_attrs(store, prefix)
    if existing is not None:
        diff = spec_diff(existing, want) + _targets_diff(store, prefix, existing, targets)
        if not diff:
            group = FitGroup(store, prefix)
            if group.missing_chunks():
                drop_row_copy(group)  # chunks about to be refitted: β may change
            return group
        if not overwrite:
            raise StoreMismatch(
                f"{prefix} group in {store.url} was fitted differently: {'; '.join(diff)}; "
                "fix: pass the same settings to resume, or overwrite=True to refit"
            )
    if store.group.get(prefix) is not None:
        delete_dir(store.group, prefix)
    k, nc = s.num_classes, math.ceil(p / tc)
    subset = {"targets": targets.spec} if targets.is_subset else {}  # an ``all`` group is today's, bit for bit
    g = store.group.create_group(
        prefix,
        attributes={
            "fingerprint": s.fingerprint, "schema_version": SCHEMA_VERSION, "kind": prefix,
            "target_chunk": tc, "row_chunk": rc, "config": config, **subset,
        },
    )
    if targets.is_subset:
        ids = g.create_array(IDS, shape=(p,), chunks=(p,), dtype="int64", compressors=COMPRESSORS, config=ARRAY_CONFIG,
                             attributes=array_attrs(s.fingerprint, "point id of each beta column (sorted)"))
        ids[...] = targets.ids
    nan = float("nan")
    for name, shape, chunks, fill, meaning in (
        ("weight", (s.n_train, p, k), (rc, tc, k), 0.0, "beta[i, x, c]: effect of train point i on logit c of x"),
        ("bias", (p, k), (tc, k), 0.0, "intercept per (x, c)"),
        ("lam", (p, k), (tc, k), nan, "L1 strength per (x, c)"),
        ("lds", (p, k), (tc, k), nan, "linear datamodeling score per (x, c)"),
        ("lds_margin", (p,), (tc,), nan, "linear datamodeling score of the margin of x"),
    ):
        g.create_array(
            name, shape=shape, chunks=chunks, dtype="float32", fill_value=fill,
            compressors=COMPRESSORS, config=ARRAY_CONFIG, attributes=array_attrs(s.fingerprint, meaning),
        )
    g.create_array(
        "done", shape=(nc,), chunks=(1,), dtype="bool", fill_value=False, compressors=COMPRESSORS,
        config=ARRAY_CONFIG, attributes=array_attrs(s.fingerprint, "target-chunk completion markers"),
    )
    return FitGroup(store, prefix)


def _opened_on_first_use(name: str) -> functools.cached_property:
    """A FitGroup attribute: the group's array ``name``, opened when first read."""
    return functools.cached_property(lambda group: group.store.zarr_array(f"{group.prefix}/{name}"))


class FitGroup:
    """``datamodels/`` or ``trak/``: β (n_train × |T| × k, T = every point unless a subset) plus per-chunk markers.

    The fit stage owns target chunks: ``write_chunk(c, ...)`` writes all rows of β's columns
    ``target_slice(c)`` (whole weight chunks in one column; points ``chunk_points(c)``) and then sets ``done[c]``.
    DM-Direct reads a few rows over all fitted targets with :meth:`read_weight_rows`.
    """

    def __init__(self, store: "AttributionStore", prefix: str, attrs: dict | None = None) -> None:
        self.store = store
        self.prefix = prefix
        self.attrs = dict(store.group[prefix].attrs) if attrs is None else attrs  # the group's, as just read
        self.target_chunk = int(self.attrs["target_chunk"])
        self.row_chunk = int(self.attrs["row_chunk"])
        self.config = self.attrs.get("config", {})
        self.targets = group_targets(self.attrs, lambda: store.zarr_array(f"{prefix}/{IDS}")[:])
        self.num_targets = self.targets.count(store.spec.n_points)  # β's columns
        self.num_chunks = math.ceil(self.num_targets / self.target_chunk)  # as create_fit_group sizes ``done``
        self.weight_rows = self.row_copy()

    # opened on first use: a request reads only ``weight_rows`` (each opening reads metadata)
    done, weight, bias, lam, lds, lds_margin = map(_opened_on_first_use,
                                                   ("done", "weight", "bias", "lam", "lds", "lds_margin"))

    def row_copy(self) -> zarr.Array | None:
        """``weight_rows`` if the store holds it complete now, else None (absent, half-written or stale)."""
        arr = get_array(self.store.group, f"{self.prefix}/{ROWS}")
        return arr if arr is not None and arr.attrs.get("complete") is True else None

    def __repr__(self) -> str:
        return f"FitGroup({self.prefix!r}, {len(self.completed_chunks())}/{self.num_chunks} target chunks)"

    def target_slice(self, chunk: int) -> slice:
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or not 0 <= chunk < self.num_chunks:
            raise StoreError(f"target chunk {chunk!r} out of range [0, {self.num_chunks}); fix: use missing_chunks()")
        return slice(int(chunk) * self.target_chunk, min((int(chunk) + 1) * self.target_chunk, self.num_targets))

    def chunk_points(self, chunk: int) -> slice | np.ndarray:
        """The point ids of chunk ``chunk``'s targets: its column slice when every point is fitted."""
        return self.targets.points(self.target_slice(chunk))

    def fitted_points(self) -> np.ndarray:
        """The point id of each β column, sorted (every point for an ``all`` group)."""
        return np.arange(self.num_targets) if self.targets.ids is None else self.targets.ids

    @property
    def deletion_scales(self) -> tuple[float, float]:
        """(c_self, c_cross) of DM-Direct's h (attribution/deletion_scale.py); (1, 1) if never calibrated."""
        record = self.attrs.get(DELETION_SCALE, {})
        return float(record.get("scale_self", 1.0)), float(record.get("scale_cross", 1.0))

    @property
    def size_effect(self) -> np.ndarray | None:
        """n·γ'_x per fitted target, float64 (|T|, k) (attribution/deletion_scale.py); None if the calibration
        trained no full-data models (the record says how many: an array without it is a stale one)."""
        if not self.attrs.get(DELETION_SCALE, {}).get("full_models"):
            return None
        return np.asarray(self.store.group[self.prefix][SIZE_EFFECT][...], dtype=np.float64)

    @property
    def has_forget_spread(self) -> bool:
        """Whether the calibration measured s_x (its record has `spread_gamma`; an older one has not)."""
        return "spread_gamma" in self.attrs.get(DELETION_SCALE, {})

    @property
    def forget_spread(self) -> np.ndarray | None:
        """s_x per training point, float32 (n_train,) (attribution/forget_spread.py); None if the calibration
        measured none (`has_forget_spread`)."""
        if not self.has_forget_spread:
            return None
        return np.asarray(self.store.group[self.prefix][FORGET_SPREAD][...])

    @functools.cached_property
    def class_labels(self) -> np.ndarray | None:
        """The labels that define the classes of the whole-class term (attribution/class_removal.py); None if the
        calibration trained no class models. All a request without a whole class reads of it."""
        if not self.attrs.get(DELETION_SCALE, {}).get("class_models"):
            return None
        return np.asarray(self.store.group[self.prefix][CLASS_ARRAYS["labels"][0]][...])

    @functools.cached_property
    def class_removal(self) -> ClassRemoval | None:
        """Δ_c and s^c_x (attribution/class_removal.py), their arrays opened, read where indexed; None as
        `class_labels`."""
        if self.class_labels is None:
            return None
        from .class_removal import ClassRemoval  # trains models too: torch, imported only where a store has it
        group = self.store.group[self.prefix]
        return ClassRemoval(group[CLASS_ARRAYS["shift"][0]], group[CLASS_ARRAYS["spread"][0]], self.class_labels)

    def write_deletion_scale(self, record: dict, size_effect: np.ndarray | None = None,
                             forget_spread: np.ndarray | None = None, class_removal: ClassRemoval | None = None) -> None:
        """Keep `dmm calibrate`'s result in the group's attrs, and its size effect (|T|, k), forget spread (n_train,)
        and whole-class term beside them (the driver writes them, once per calibration: the arrays first, so the
        record never names a missing one)."""
        self.store._require_writable()
        group = self.store.group[self.prefix]
        arrays = [(SIZE_EFFECT, size_effect, "n·γ'_x: the training set size's effect on (x, c), per point added, "
                   "times n"), (FORGET_SPREAD, forget_spread, "s_x: a retrained model's extra margin sd on x")]
        if class_removal is not None:
            arrays += [(name, getattr(class_removal, field), doc) for field, (name, doc) in CLASS_ARRAYS.items()]
        for name, array, doc in arrays:
            if array is not None:
                array = np.asarray(array)
                if array.dtype.kind == "f":
                    array = array.astype(np.float32)
                group.create_array(name, data=array, overwrite=True, chunks=array.shape, compressors=COMPRESSORS,
                                   config=ARRAY_CONFIG, attributes=array_attrs(self.store.spec.fingerprint, doc))
        group.attrs.update({DELETION_SCALE: record})
        self.attrs[DELETION_SCALE] = record
        for name in ("class_labels", "class_removal"):  # opened from the record before: reopen from this one
            self.__dict__.pop(name, None)

    def completed_chunks(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(np.asarray(self.done[:], dtype=bool))]

    def missing_chunks(self) -> list[int]:
        done = set(self.completed_chunks())
        return [c for c in range(self.num_chunks) if c not in done]

    def is_complete(self) -> bool:
        """Every target chunk done. A complete ``weight_rows`` implies it (it is written after the last chunk and
        invalidated before any refit), which spares a request reading every marker."""
        return self.weight_rows is not None or not self.missing_chunks()

    def write_chunk(
        self,
        chunk: int,
        weight: np.ndarray,
        bias: np.ndarray,
        lam: np.ndarray | None = None,
        lds: np.ndarray | None = None,
        lds_margin: np.ndarray | None = None,
    ) -> None:
        """Write target chunk ``chunk``: weight (n_train × t × k), bias/lam/lds (t × k), lds_margin (t,); marker last."""
        self.store._require_writable()
        sl = self.target_slice(chunk)
        if self.row_copy() is not None:
            raise StoreError(f"{self.prefix}/{ROWS} in {self.store.url} is a complete copy of β; fix: reopen the "
                             "group with create_fit_group (the driver invalidates the copy) before refitting chunks")
        s = self.store.spec
        t, k = sl.stop - sl.start, s.num_classes
        arrays = {"weight": (weight, (s.n_train, t, k))}
        for name, val in (("bias", bias), ("lam", lam), ("lds", lds)):
            if val is not None:
                arrays[name] = (val, (t, k))
        if lds_margin is not None:
            arrays["lds_margin"] = (lds_margin, (t,))
        for name, (val, shape) in arrays.items():
            val = np.asarray(val)
            if val.shape != shape:
                raise StoreError(
                    f"{self.prefix} chunk {chunk} {name} has shape {val.shape}, expected {shape}; "
                    "fix: fit all rows of the chunk's targets"
                )
            arrays[name] = (val.astype(np.float32, copy=False), shape)
        self.weight[:, sl, :] = arrays["weight"][0]
        for name in ("bias", "lam", "lds", "lds_margin"):
            if name in arrays:
                getattr(self, name)[sl] = arrays[name][0]
        self.done[chunk : chunk + 1] = np.ones(1, dtype=bool)

    def _checked_rows(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= self.store.spec.n_train)):
            raise StoreError(f"rows must be train indices in [0, {self.store.spec.n_train}); fix: pass forget-set indices")
        return rows

    def read_weight_rows(self, rows: Sequence[int] | np.ndarray, targets: slice | None = None) -> np.ndarray:
        """β rows for training points ``rows`` (len(rows) × targets × k): what DM-Direct sums over F.

        Read from ``weight_rows`` (one object a row) when the group was opened with it complete, else from ``weight``.
        """
        rows = self._checked_rows(rows)
        t = slice(None) if targets is None else targets
        beta = self.weight if self.weight_rows is None else self.weight_rows
        if rows.size == 0:
            return np.asarray(beta[0:0, t, :])
        return np.asarray(beta.oindex[rows, t, :])

    def target_columns(self, points: np.ndarray) -> np.ndarray:
        """β's column of each point, −1 where the point is not a fitted target."""
        points = np.asarray(points, dtype=np.int64)
        if self.targets.ids is None:
            return points
        at = np.minimum(np.searchsorted(self.targets.ids, points), len(self.targets.ids) - 1)
        return np.where(self.targets.ids[at] == points, at, -1)

    def sum_weight_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Σ_{i∈rows} β_{i,x,:} for every fitted target x, float64 (|T| × k): DM-Direct's forget effect."""
        return self.sum_and_own_rows(rows)[0]

    def sum_and_own_rows(self, rows: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Σ_{i∈rows} β_{i,x,:} for every fitted target x, float64 (|T| × k); each row's effect on its own point,
        β_{i,i,:}, float64 (|rows| × k; 0 where i is not a fitted target)), in one pass over the rows.

        From a complete ``weight_rows`` its objects are fetched together and decoded here, ROW_BATCH rows
        at a time: Zarr's own indexing costs about 1 ms an object, most of a small request's fixed cost.
        Otherwise (older stores, another codec chain) from :meth:`read_weight_rows`. Same sums either way.
        """
        rows = self._checked_rows(rows)
        s = self.store.spec
        total = np.zeros((self.num_targets, s.num_classes), dtype=np.float64)
        own = np.zeros((len(rows), s.num_classes), dtype=np.float64)
        columns = self.target_columns(rows)
        for start in range(0, len(rows), ROW_BATCH):  # (an empty F sums to zeros)
            batch = np.zeros_like(total)
            for j, row in self._rows_for_sum(rows, start):
                batch += row  # in order, as `.sum(axis=0, dtype=np.float64)` of the batch adds
                if columns[j] >= 0:
                    own[j] = row[columns[j]]
            total += batch
        return total, own

    def _rows_for_sum(self, rows: np.ndarray, start: int) -> Iterable[tuple[int, np.ndarray]]:
        """(j, β_{rows[j]}) for j in [start, start + ROW_BATCH), skipping rows the store holds as zeros."""
        batch = rows[start:start + ROW_BATCH]
        arr = self.weight_rows
        if arr is None or tuple(arr.metadata.codecs) != ROW_CODECS or arr.chunks != (1, *arr.shape[1:]):
            return enumerate(self.read_weight_rows(batch), start)
        return decoded_rows(arr, batch, start)

    def read_bias(self, targets: slice | None = None) -> np.ndarray:
        return np.asarray(self.bias[slice(None) if targets is None else targets])
