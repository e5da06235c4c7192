"""The attribution store: one Zarr v3 group per (dataset fingerprint, model, recipe).

Every stage reads and writes through this module (DESIGN.md §4). The store lives
on a plain local path (``zarr.storage.LocalStore``) or on any fsspec URL such as
``memory://x`` / ``file:///x`` / ``s3://bucket/x`` (``zarr.storage.FsspecStore``).

Rules the code enforces:

* The root attributes name what the store was built for (``StoreSpec``). Opening
  it for a different dataset fingerprint, model, recipe, alpha, seed, block size
  or shape raises ``StoreMismatch`` *before anything is written* (the check runs
  on a read-only handle).
* Writers write whole chunks they own: a subset block is exactly one chunk of
  ``subsets/masks`` and one of ``subsets/logits``; a fit target-chunk is one
  column of ``<prefix>/weight`` chunks. The block's marker (its own one-element
  chunk of a ``done`` array) is set only *after* the data; readers see only
  marked blocks. Rewriting a block writes the same bytes (fixed zstd codec).
* Every array carries ``fingerprint`` and ``schema_version`` attributes.

Schema: :func:`schema_table` returns it as a Markdown table (m = allocated subset
models, a multiple of block_size; n = n_train; p = n_points, train points first
then held-out; k = num_classes).

Concurrency: creation, ``ensure_capacity`` and fit-group creation rewrite
metadata and belong to one driver process. Workers then open the store with
``AttributionStore.open(url, mode="r+")`` (or unpickle a handle, which does the
same) and only call ``write_block`` / ``FitGroup.write_chunk`` for blocks or
chunks they own.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.errors import ContainsGroupError
from zarr.storage import FsspecStore, LocalStore
from .errors import DmmError

__all__ = [
    "SCHEMA_VERSION",
    "STORE_KIND",
    "StoreError",
    "StoreMismatch",
    "StoreSpec",
    "AttributionStore",
    "FitGroup",
    "FIT_PREFIXES",
    "schema_table",
]

SCHEMA_VERSION = 1
STORE_KIND = "dmm-attribution-store"
FIT_PREFIXES = ("datamodels", "trak")

# One fixed codec chain for every array: same data -> same bytes, whatever zarr's
# defaults become. (bytes serializer is zarr's default for fixed-size dtypes.)
_COMPRESSORS = (ZstdCodec(level=3, checksum=False),)
_ARRAY_CONFIG = {"write_empty_chunks": True}  # every owned chunk exists as an object

_MASKS = "subsets/masks"
_LOGITS = "subsets/logits"
_DONE = "subsets/done"
_ORIGINAL = "original/logits"


class StoreError(DmmError):
    """A store problem; the message is one line naming the problem and the fix."""


class StoreMismatch(StoreError):
    """The store was built for a different request (dataset, model, recipe, ...)."""


# --------------------------------------------------------------------------- schema

_SCHEMA_ROWS: tuple[tuple[str, str, str, str, str], ...] = (
    ("`/` (group attrs)", "—", "—", "—",
     "schema_version, kind, dataset, fingerprint (sha256), model, recipe (JSON), alpha, "
     "seed, block_size, n_train, n_points, num_classes, num_models_requested"),
    ("`subsets/masks`", "m × n", "bool", "block_size × n",
     "row j: which training points subset model j was trained on"),
    ("`subsets/logits`", "m × p × k", "float32", "block_size × p × k",
     "logits of subset model j on every train, then held-out, point"),
    ("`subsets/done`", "m / block_size", "bool", "1",
     "block b complete (set after its masks and logits); readers see marked blocks only"),
    ("`datamodels/weight`", "n × p × k", "float32", "row_chunk × target_chunk × k",
     "β_{i,x,c}: effect of training point i on logit c of target x"),
    ("`datamodels/bias`", "p × k", "float32", "target_chunk × k", "β0_{x,c} intercept"),
    ("`datamodels/lam`", "p × k", "float32", "target_chunk × k",
     "chosen L1 strength λ per regression (NaN = not fitted)"),
    ("`datamodels/lds`", "p × k", "float32", "target_chunk × k",
     "linear datamodeling score per target/class (NaN = not measured)"),
    ("`datamodels/lds_margin`", "p", "float32", "target_chunk",
     "linear datamodeling score of the margin of target x (NaN = not measured)"),
    ("`datamodels/done`", "⌈p / target_chunk⌉", "bool", "1",
     "target chunk c fitted (set after weight/bias/lam/lds)"),
    ("`trak/*`", "as `datamodels/*`", "as `datamodels/*`", "as `datamodels/*`",
     "the same matrices estimated by TRAK"),
    ("`original/logits`", "p × k", "float32", "p × k",
     "logits of the original model θ0; attr model_sha256 names its file (set after data)"),
)


def schema_table() -> str:
    """The store schema as a README-ready Markdown table."""
    head = "| array | shape | dtype | chunks | meaning |\n|---|---|---|---|---|\n"
    body = "".join("| " + " | ".join(r) + " |\n" for r in _SCHEMA_ROWS)
    foot = (
        "\nm = allocated subset models (multiple of block_size), n = n_train, "
        "p = n_points (train points first, then held-out), k = num_classes. "
        "Every array has attrs `fingerprint` and `schema_version`; codec zstd level 3."
    )
    return head + body + foot


# --------------------------------------------------------------------------- spec


def _norm_json(value: Any, what: str) -> Any:
    """JSON round-trip so tuples/lists and key order compare like the stored copy."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"{what} is not plain JSON ({exc}); fix: pass only str/int/float/bool/list/dict values"
        ) from None


@dataclass(frozen=True)
class StoreSpec:
    """What a request expects the store to be (the store's identity + shape)."""

    dataset: str
    fingerprint: str
    model: str
    recipe: dict
    alpha: float
    seed: int
    block_size: int
    n_train: int
    n_points: int
    num_classes: int

    def __post_init__(self) -> None:
        for name in ("dataset", "fingerprint", "model"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise StoreError(f"StoreSpec.{name} must be a non-empty string, got {v!r}; fix: pass it")
        if not isinstance(self.recipe, dict):
            raise StoreError(f"StoreSpec.recipe must be a dict, got {type(self.recipe).__name__}; fix: pass a JSON dict")
        object.__setattr__(self, "recipe", _norm_json(self.recipe, "StoreSpec.recipe"))
        alpha = float(self.alpha)
        if not 0.0 < alpha < 1.0:
            raise StoreError(f"StoreSpec.alpha must be in (0, 1), got {self.alpha!r}; fix: use e.g. 0.5")
        object.__setattr__(self, "alpha", alpha)
        for name in ("seed", "block_size", "n_train", "n_points", "num_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise StoreError(f"StoreSpec.{name} must be an int, got {v!r}; fix: pass an int")
            object.__setattr__(self, name, int(v))
        for name in ("block_size", "n_train", "num_classes"):
            if getattr(self, name) < 1:
                raise StoreError(f"StoreSpec.{name} must be >= 1, got {getattr(self, name)}; fix: pass a positive int")
        if self.n_points < self.n_train:
            raise StoreError(
                f"StoreSpec.n_points ({self.n_points}) < n_train ({self.n_train}); "
                "fix: n_points counts train points then held-out points"
            )

    def to_attrs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_attrs(cls, attrs: dict) -> "StoreSpec":
        return cls(**{f.name: attrs[f.name] for f in fields(cls)})


_SPEC_KEYS = tuple(f.name for f in fields(StoreSpec))


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "recipe":
        return _norm_json(a, "recipe") == _norm_json(b, "recipe")
    if key == "alpha":
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 48 else s[:45] + "..."


def _diff(stored: dict, expected: dict) -> list[str]:
    out = []
    for key, want in expected.items():
        have = stored.get(key)
        if _same(key, have, want):
            continue
        if key == "recipe" and isinstance(have, dict) and isinstance(want, dict):
            want = _norm_json(want, "recipe")
            sub = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            detail = ", ".join(f"recipe.{k} store={_short(have.get(k))} request={_short(want.get(k))}" for k in sub)
            out.append(detail or f"recipe store={_short(have)} request={_short(want)}")
        else:
            out.append(f"{key} store={_short(have)} request={_short(want)}")
    return out


# --------------------------------------------------------------------------- zarr plumbing


def _has_scheme(url: str) -> bool:
    return "://" in url or "::" in url


def _normalize_url(url: str | os.PathLike) -> str:
    url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise StoreError(f"store URL must be a non-empty path or fsspec URL, got {url!r}; fix: pass --store PATH")
    if _has_scheme(url):
        return url
    return str(Path(url).expanduser().absolute())


def _make_store(url: str, read_only: bool):
    if _has_scheme(url):
        # fsspec's LocalFileSystem does not create parent dirs unless asked to
        opts = {"auto_mkdir": True} if url.startswith(("file://", "local://")) else None
        return FsspecStore.from_url(url, storage_options=opts, read_only=read_only)
    return LocalStore(url, read_only=read_only)


def _path_is_nonempty_nonstore(url: str) -> bool:
    """True if something that is not a zarr store already sits at ``url``."""
    if _has_scheme(url):
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(url)
        try:
            if not fs.exists(path):
                return False
            if fs.isfile(path):
                return True
            return len(fs.ls(path, detail=False)) > 0
        except FileNotFoundError:
            return False
    p = Path(url)
    if not p.exists():
        return False
    return p.is_file() or any(p.iterdir())


def _open_group_ro(url: str) -> zarr.Group | None:
    """Root group opened read-only, or None if there is no zarr group at ``url``."""
    try:
        store = _make_store(url, read_only=True)
        return zarr.open_group(store, mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        return None
    except (ValueError, KeyError, OSError) as exc:
        raise StoreError(f"cannot read {url} as a Zarr v3 group ({exc}); fix: point --store at an attribution store") from None


def _array_attrs(fingerprint: str, meaning: str, **extra: Any) -> dict:
    return {"fingerprint": fingerprint, "schema_version": SCHEMA_VERSION, "meaning": meaning, **extra}


def _get_array(group: zarr.Group, path: str) -> zarr.Array | None:
    try:
        node = group[path]
    except KeyError:
        return None
    if not isinstance(node, zarr.Array):
        return None
    return node.with_config(_ARRAY_CONFIG)


def _runs(blocks: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted block ids -> [start, stop) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


# --------------------------------------------------------------------------- the store


class AttributionStore:
    """Handle on one attribution store. Build with :meth:`open_or_create` or :meth:`open`."""

    url: str
    spec: StoreSpec
    attrs: dict

    def __init__(self, url: str, group: zarr.Group, mode: str) -> None:
        # private: use open() / open_or_create()
        self.url = url
        self.mode = mode
        self._group = group
        self._load()

    # ---------------------------------------------------------------- construction

    @classmethod
    def open_or_create(cls, url: str, spec: StoreSpec, num_models: int) -> "AttributionStore":
        """Open the store at ``url`` for ``spec``, creating it if absent, grown to ``num_models``.

        Raises ``StoreMismatch`` (nothing written) if the store was built for a different
        spec, and ``StoreError`` (nothing written) if ``num_models`` is below the store's
        requested total or ``url`` holds something that is not an attribution store.
        """
        url = _normalize_url(url)
        if not isinstance(spec, StoreSpec):
            raise StoreError(f"spec must be a StoreSpec, got {type(spec).__name__}; fix: build a StoreSpec")
        num_models = cls._check_num_models(num_models)
        for _attempt in range(2):
            ro = _open_group_ro(url)
            if ro is not None:
                cls._validate_root(url, dict(ro.attrs))
                diff = _diff(dict(ro.attrs), spec.to_attrs())
                if diff:
                    raise StoreMismatch(
                        f"store {url} was built for a different request: {'; '.join(diff)}; "
                        "fix: use a new --store path (one store per dataset fingerprint, model and recipe) "
                        "or rerun with the store's settings"
                    )
                have = int(ro.attrs.get("num_models_requested", 0))
                if num_models < have:
                    raise StoreError(cls._shrink_msg(url, num_models, have))
                rw = zarr.open_group(_make_store(url, read_only=False), mode="r+", zarr_format=3)
                store = cls.__new__(cls)
                store.url, store.mode, store._group = url, "r+", rw
                store._ensure_layout(StoreSpec.from_attrs(dict(ro.attrs)), have or num_models)
                store._load()
                store.ensure_capacity(num_models)
                return store
            if _path_is_nonempty_nonstore(url):
                raise StoreError(
                    f"{url} exists and is not an attribution store; fix: pass an empty or new --store path"
                )
            attrs = {
                "schema_version": SCHEMA_VERSION,
                "kind": STORE_KIND,
                **spec.to_attrs(),
                "num_models_requested": num_models,
            }
            try:
                group = zarr.create_group(
                    _make_store(url, read_only=False), attributes=attrs, overwrite=False, zarr_format=3
                )
            except ContainsGroupError:
                continue  # someone created it concurrently: go round and check it
            store = cls.__new__(cls)
            store.url, store.mode, store._group = url, "r+", group
            store._ensure_layout(spec, num_models)
            store._load()
            return store
        raise StoreError(f"could not create or open {url} (concurrent creation?); fix: rerun the command")

    @classmethod
    def open(cls, url: str, mode: str = "r") -> "AttributionStore":
        """Open an existing store; ``mode`` is ``"r"`` (read-only) or ``"r+"`` (write blocks)."""
        if mode not in ("r", "r+"):
            raise StoreError(f"mode must be 'r' or 'r+', got {mode!r}; fix: use open_or_create to create a store")
        url = _normalize_url(url)
        ro = _open_group_ro(url)
        if ro is None:
            raise StoreError(f"no attribution store at {url}; fix: run `dmm estimate` (or check the --store path)")
        cls._validate_root(url, dict(ro.attrs))
        group = ro if mode == "r" else zarr.open_group(_make_store(url, read_only=False), mode="r+", zarr_format=3)
        return cls(url, group, mode)

    def __reduce__(self):
        # Ray/pickle: a handle travels as (url, mode) and reopens on the other side.
        return (AttributionStore.open, (self.url, self.mode))

    def __repr__(self) -> str:
        return (
            f"AttributionStore({self.url!r}, model={self.spec.model!r}, "
            f"{self.completed_models()}/{self.num_models} models)"
        )

    def refresh(self) -> None:
        """Reload attributes and array metadata (e.g. after another process grew the store)."""
        self._group = zarr.open_group(
            _make_store(self.url, read_only=self.mode == "r"), mode=self.mode, zarr_format=3
        )
        self._load()

    @staticmethod
    def _check_num_models(num_models: int) -> int:
        if isinstance(num_models, bool) or not isinstance(num_models, (int, np.integer)) or num_models < 1:
            raise StoreError(f"num_models must be a positive int, got {num_models!r}; fix: pass --num-models N >= 1")
        return int(num_models)

    @staticmethod
    def _shrink_msg(url: str, want: int, have: int) -> str:
        return (
            f"store {url} already holds a request for {have} models and shrinking to {want} is refused; "
            f"fix: pass --num-models >= {have} or use a new --store path"
        )

    @staticmethod
    def _validate_root(url: str, attrs: dict) -> None:
        if attrs.get("kind") != STORE_KIND or "schema_version" not in attrs:
            raise StoreError(f"{url} is a Zarr group but not an attribution store; fix: pass an attribution store path")
        if attrs["schema_version"] != SCHEMA_VERSION:
            raise StoreError(
                f"store {url} has schema version {attrs['schema_version']!r}, this code reads {SCHEMA_VERSION}; "
                "fix: rebuild the store with this version or use the matching dmm-pipeline version"
            )
        missing = [k for k in _SPEC_KEYS if k not in attrs]
        if missing:
            raise StoreError(f"store {url} lacks root attributes {missing}; fix: rebuild the store")

    def _ensure_layout(self, spec: StoreSpec, num_models: int) -> None:
        """Create whichever subset arrays are missing (idempotent; repairs an interrupted creation)."""
        g = self._group
        bs = spec.block_size
        nb = math.ceil(num_models / bs)
        m = nb * bs
        shapes = {
            _MASKS: ((m, spec.n_train), (bs, spec.n_train), "bool", False,
                     "row j: training points used by subset model j"),
            _LOGITS: ((m, spec.n_points, spec.num_classes), (bs, spec.n_points, spec.num_classes), "float32", 0.0,
                      "logits of subset model j on train then held-out points"),
            _DONE: ((nb,), (1,), "bool", False, "block completion markers (set after data)"),
        }
        for path, (shape, chunks, dtype, fill, meaning) in shapes.items():
            if _get_array(g, path) is None:
                g.create_array(
                    path, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                    compressors=_COMPRESSORS, attributes=_array_attrs(spec.fingerprint, meaning),
                    config=_ARRAY_CONFIG,
                )

    def _load(self) -> None:
        attrs = dict(self._group.attrs)
        self._validate_root(self.url, attrs)
        self.attrs = attrs
        self.spec = StoreSpec.from_attrs(attrs)
        arrays = {p: _get_array(self._group, p) for p in (_MASKS, _LOGITS, _DONE)}
        missing = [p for p, a in arrays.items() if a is None]
        if missing:
            raise StoreError(
                f"store {self.url} is incomplete (missing {missing}); fix: rerun `dmm estimate`, which repairs it"
            )
        self._masks, self._logits, self._done = arrays[_MASKS], arrays[_LOGITS], arrays[_DONE]
        s, bs = self.spec, self.spec.block_size
        for path, arr in arrays.items():
            a = dict(arr.attrs)
            if a.get("fingerprint") != s.fingerprint or a.get("schema_version") != SCHEMA_VERSION:
                raise StoreError(
                    f"array {path} in {self.url} carries fingerprint/schema {a.get('fingerprint')!r}/"
                    f"{a.get('schema_version')!r}, root says {s.fingerprint!r}/{SCHEMA_VERSION}; fix: rebuild the store"
                )
        ok = (
            self._masks.shape[1:] == (s.n_train,)
            and self._logits.shape[1:] == (s.n_points, s.num_classes)
            and self._masks.chunks[0] == bs and self._logits.chunks[0] == bs
        )
        if not ok:
            raise StoreError(f"store {self.url} has arrays whose shape disagrees with its attributes; fix: rebuild the store")

    # ---------------------------------------------------------------- identity

    @property
    def group(self) -> zarr.Group:
        """The root zarr group (for stages that add their own arrays, e.g. the ledger)."""
        return self._group

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def num_models(self) -> int:
        """The requested total number of subset models."""
        return int(self.attrs["num_models_requested"])

    @property
    def num_blocks(self) -> int:
        """Blocks whose rows exist in every subset array (interrupted growth counts the smallest)."""
        bs = self.block_size
        return min(self._done.shape[0], self._masks.shape[0] // bs, self._logits.shape[0] // bs)

    @property
    def allocated_models(self) -> int:
        return self.num_blocks * self.block_size

    def check(self, **expected: Any) -> None:
        """Raise ``StoreMismatch`` naming every root attribute that differs from ``expected``."""
        unknown = [k for k in expected if k not in self.attrs]
        if unknown:
            raise StoreError(f"check() got unknown store attributes {unknown}; fix: use one of {sorted(self.attrs)}")
        diff = _diff(self.attrs, expected)
        if diff:
            raise StoreMismatch(
                f"store {self.url} does not match: {'; '.join(diff)}; "
                "fix: use the store built for this dataset/model/recipe or a new --store path"
            )

    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise StoreError(f"store {self.url} is open read-only; fix: AttributionStore.open(url, mode='r+')")

    # ---------------------------------------------------------------- capacity

    def ensure_capacity(self, num_models: int) -> None:
        """Grow the subset arrays to hold ``num_models`` (rounded up to whole blocks). Never shrinks."""
        num_models = self._check_num_models(num_models)
        if num_models < self.num_models:
            raise StoreError(self._shrink_msg(self.url, num_models, self.num_models))
        nb = math.ceil(num_models / self.block_size)
        if nb > self.num_blocks or num_models != self.num_models:
            self._require_writable()
        m = nb * self.block_size
        # data arrays first, markers after, requested count last: a crash leaves num_blocks
        # (the min over arrays) consistent, and rerunning repairs.
        if self._masks.shape[0] < m:
            self._masks.resize((m,) + self._masks.shape[1:])
        if self._logits.shape[0] < m:
            self._logits.resize((m,) + self._logits.shape[1:])
        if self._done.shape[0] < nb:
            self._done.resize((nb,))
        if num_models != self.num_models:
            self._group.attrs.update({"num_models_requested": num_models})
            self.attrs = dict(self._group.attrs)

    # ---------------------------------------------------------------- blocks

    def _check_block(self, block: int) -> int:
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 0 <= block < self.num_blocks:
            raise StoreError(
                f"block {block!r} out of range [0, {self.num_blocks}) in {self.url}; "
                "fix: call ensure_capacity()/refresh() or use a block from missing_blocks()"
            )
        return int(block)

    def block_rows(self, block: int) -> slice:
        """Rows of the subset arrays that belong to ``block``."""
        b = self._check_block(block)
        return slice(b * self.block_size, (b + 1) * self.block_size)

    def block_done(self, block: int) -> bool:
        b = self._check_block(block)
        return bool(self._done[b])

    def completed_blocks(self) -> list[int]:
        """Blocks whose marker is set (read fresh from the store each call)."""
        nb = self.num_blocks
        if nb == 0:
            return []
        done = np.asarray(self._done[:nb], dtype=bool)
        return [int(i) for i in np.flatnonzero(done)]

    def missing_blocks(self) -> list[int]:
        done = set(self.completed_blocks())
        return [b for b in range(self.num_blocks) if b not in done]

    def completed_models(self) -> int:
        return len(self.completed_blocks()) * self.block_size

    def write_block(self, block: int, masks: np.ndarray, logits: np.ndarray) -> None:
        """Write block ``block``'s masks and logits (exactly its own chunks), then set its marker."""
        self._require_writable()
        rows = self.block_rows(block)
        s, bs = self.spec, self.block_size
        masks = np.asarray(masks)
        if masks.shape != (bs, s.n_train):
            raise StoreError(f"block {block} masks have shape {masks.shape}, store expects {(bs, s.n_train)}; fix: train block_size models per block")
        if masks.dtype != np.bool_:
            if not np.isin(masks, (0, 1)).all():
                raise StoreError(f"block {block} masks are not 0/1; fix: pass boolean subset masks")
            masks = masks.astype(bool)
        logits = np.asarray(logits)
        if logits.shape != (bs, s.n_points, s.num_classes):
            raise StoreError(
                f"block {block} logits have shape {logits.shape}, store expects {(bs, s.n_points, s.num_classes)}; "
                "fix: evaluate every model on train then held-out points"
            )
        logits = logits.astype(np.float32, copy=False)
        if not np.isfinite(logits).all():
            raise StoreError(f"block {block} logits contain NaN/inf; fix: rerun the block (training diverged?)")
        self._masks[rows] = masks
        self._logits[rows] = logits
        self._done[block : block + 1] = np.ones(1, dtype=bool)  # marker last

    def _resolve_blocks(self, blocks: Iterable[int] | None) -> list[int]:
        if blocks is None:
            return self.completed_blocks()
        blocks = sorted({self._check_block(b) for b in blocks})
        done = set(self.completed_blocks())
        not_done = [b for b in blocks if b not in done]
        if not_done:
            raise StoreError(f"blocks {not_done} of {self.url} are not complete; fix: read completed_blocks() only")
        return blocks

    def _read_rows(self, arr: zarr.Array, blocks: list[int], tail: tuple) -> np.ndarray:
        bs = self.block_size
        runs = _runs(blocks) or [(0, 0)]  # no blocks: a (0, ...) array of the right shape
        parts = [np.asarray(arr[(slice(a * bs, b * bs),) + tail]) for a, b in runs]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def read_masks(self, blocks: Iterable[int] | None = None) -> np.ndarray:
        """Masks of completed blocks (all completed if ``blocks`` is None), in block order.

        Read masks and logits with the same explicit ``blocks`` list (e.g. from
        ``completed_blocks()`` or :meth:`read`) so rows stay aligned while writers run.
        """
        return self._read_rows(self._masks, self._resolve_blocks(blocks), ())

    def read_logits(self, blocks: Iterable[int] | None = None, targets: slice | None = None) -> np.ndarray:
        """Logits (rows × targets × k) of completed blocks; ``targets`` slices the point axis."""
        tail = () if targets is None else (targets,)
        return self._read_rows(self._logits, self._resolve_blocks(blocks), tail)

    def read(self, blocks: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """A consistent snapshot: (masks, logits, blocks) of the completed blocks."""
        blocks = self._resolve_blocks(blocks)
        return self.read_masks(blocks), self.read_logits(blocks), blocks

    # ---------------------------------------------------------------- generic access

    def zarr_array(self, path: str) -> zarr.Array:
        """The zarr array at ``path`` (e.g. for ``dask.array.from_zarr``). Raw: ignores markers."""
        arr = _get_array(self._group, path)
        if arr is None:
            raise StoreError(f"no array {path!r} in store {self.url}; fix: run the stage that writes it")
        return arr

    def has(self, path: str) -> bool:
        return _get_array(self._group, path) is not None

    # ---------------------------------------------------------------- original model

    def write_original_logits(self, logits: np.ndarray, model_sha256: str) -> None:
        """Store θ0's logits (n_points × k); ``model_sha256`` identifies the model file (set after data)."""
        self._require_writable()
        s = self.spec
        logits = np.asarray(logits)
        if logits.shape != (s.n_points, s.num_classes):
            raise StoreError(
                f"original logits have shape {logits.shape}, store expects {(s.n_points, s.num_classes)}; "
                "fix: evaluate θ0 on train then held-out points"
            )
        if not isinstance(model_sha256, str) or not model_sha256:
            raise StoreError("model_sha256 must be a non-empty string; fix: pass the model file's sha256")
        arr = _get_array(self._group, _ORIGINAL)
        if arr is None:
            arr = self._group.create_array(
                _ORIGINAL, shape=logits.shape, chunks=logits.shape, dtype="float32", fill_value=float("nan"),
                compressors=_COMPRESSORS, config=_ARRAY_CONFIG,
                attributes=_array_attrs(s.fingerprint, "logits of the original model θ0", model_sha256=None),
            )
        elif arr.attrs.get("model_sha256") is not None:
            arr.attrs.update({"model_sha256": None})  # invalidate, then write, then name
        arr[...] = logits.astype(np.float32, copy=False)
        arr.attrs.update({"model_sha256": model_sha256})

    def original_model_sha256(self) -> str | None:
        arr = _get_array(self._group, _ORIGINAL)
        return None if arr is None else arr.attrs.get("model_sha256")

    def read_original_logits(self, model_sha256: str | None = None) -> np.ndarray | None:
        """θ0's logits, or None if absent. Raises ``StoreMismatch`` if ``model_sha256`` differs."""
        arr = _get_array(self._group, _ORIGINAL)
        if arr is None or arr.attrs.get("model_sha256") is None:
            return None
        have = arr.attrs["model_sha256"]
        if model_sha256 is not None and have != model_sha256:
            raise StoreMismatch(
                f"original logits in {self.url} belong to model {have[:16]}..., not {model_sha256[:16]}...; "
                "fix: rerun `dmm originals` to refresh them"
            )
        return np.asarray(arr[...])

    # ---------------------------------------------------------------- fit groups

    def create_fit_group(
        self,
        prefix: str,
        target_chunk: int,
        row_chunk: int,
        config: dict | None = None,
        overwrite: bool = False,
    ) -> "FitGroup":
        """Create (or reopen, if identical) the ``datamodels``/``trak`` group; see :class:`FitGroup`.

        An existing group with a different target_chunk/row_chunk/config raises
        ``StoreMismatch`` unless ``overwrite=True``, which deletes it first.
        """
        self._require_writable()
        if prefix not in FIT_PREFIXES:
            raise StoreError(f"fit group prefix must be one of {FIT_PREFIXES}, got {prefix!r}; fix: use one of them")
        s = self.spec
        for name, v in (("target_chunk", target_chunk), ("row_chunk", row_chunk)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise StoreError(f"{name} must be a positive int, got {v!r}; fix: pass e.g. 256")
        tc, rc = min(int(target_chunk), s.n_points), min(int(row_chunk), s.n_train)
        config = _norm_json(config or {}, f"{prefix} config")
        want = {"target_chunk": tc, "row_chunk": rc, "config": config}
        existing = self._existing_fit_group(prefix)
        if existing is not None:
            diff = _diff(existing, want)
            if not diff:
                return self.fit_group(prefix)
            if not overwrite:
                raise StoreMismatch(
                    f"{prefix} group in {self.url} was fitted differently: {'; '.join(diff)}; "
                    "fix: pass the same settings to resume, or overwrite=True to refit"
                )
        if self._group.get(prefix) is not None:
            _delete_dir(self._group, prefix)
        k, nc = s.num_classes, math.ceil(s.n_points / tc)
        g = self._group.create_group(
            prefix,
            attributes={
                "fingerprint": s.fingerprint, "schema_version": SCHEMA_VERSION, "kind": prefix,
                "target_chunk": tc, "row_chunk": rc, "config": config,
            },
        )
        nan = float("nan")
        for name, shape, chunks, fill, meaning in (
            ("weight", (s.n_train, s.n_points, k), (rc, tc, k), 0.0, "beta[i, x, c]: effect of train point i on logit c of x"),
            ("bias", (s.n_points, k), (tc, k), 0.0, "intercept per (x, c)"),
            ("lam", (s.n_points, k), (tc, k), nan, "L1 strength per (x, c)"),
            ("lds", (s.n_points, k), (tc, k), nan, "linear datamodeling score per (x, c)"),
            ("lds_margin", (s.n_points,), (tc,), nan, "linear datamodeling score of the margin of x"),
        ):
            g.create_array(
                name, shape=shape, chunks=chunks, dtype="float32", fill_value=fill,
                compressors=_COMPRESSORS, config=_ARRAY_CONFIG, attributes=_array_attrs(s.fingerprint, meaning),
            )
        g.create_array(
            "done", shape=(nc,), chunks=(1,), dtype="bool", fill_value=False, compressors=_COMPRESSORS,
            config=_ARRAY_CONFIG, attributes=_array_attrs(s.fingerprint, "target-chunk completion markers"),
        )
        return self.fit_group(prefix)

    def _existing_fit_group(self, prefix: str) -> dict | None:
        node = self._group.get(prefix)
        if node is None or not isinstance(node, zarr.Group):
            return None
        return dict(node.attrs)

    def fit_group(self, prefix: str) -> "FitGroup":
        """Open an existing ``datamodels``/``trak`` group (StoreError if absent)."""
        if prefix not in FIT_PREFIXES:
            raise StoreError(f"fit group prefix must be one of {FIT_PREFIXES}, got {prefix!r}; fix: use one of them")
        attrs = self._existing_fit_group(prefix)
        if attrs is None:
            raise StoreError(f"no {prefix} group in store {self.url}; fix: run the fit stage first")
        return FitGroup(self, prefix)

    def has_fit_group(self, prefix: str) -> bool:
        return self._existing_fit_group(prefix) is not None

    # ---------------------------------------------------------------- status

    def summary(self) -> dict:
        """Everything `dmm status` prints: attributes, progress of each stage."""
        out = {
            "url": self.url,
            "schema_version": self.attrs["schema_version"],
            **self.spec.to_attrs(),
            "num_models": self.num_models,
            "allocated_models": self.allocated_models,
            "completed_models": self.completed_models(),
            "num_blocks": self.num_blocks,
            "completed_blocks": len(self.completed_blocks()),
            "original_model_sha256": self.original_model_sha256(),
        }
        for prefix in FIT_PREFIXES:
            if self.has_fit_group(prefix):
                fg = self.fit_group(prefix)
                out[prefix] = {
                    "completed_chunks": len(fg.completed_chunks()),
                    "num_chunks": fg.num_chunks,
                    "target_chunk": fg.target_chunk,
                    "row_chunk": fg.row_chunk,
                    "config": fg.config,
                }
            else:
                out[prefix] = None
        return out


def _delete_dir(group: zarr.Group, prefix: str) -> None:
    """Delete every key under ``prefix`` in the group's store (used to refit a fit group)."""
    from zarr.core.sync import sync

    sync(group.store.delete_dir(prefix))


# --------------------------------------------------------------------------- fit groups


class FitGroup:
    """``datamodels/`` or ``trak/``: β (n_train × n_points × k) plus per-target-chunk markers.

    The fit stage owns target chunks: ``write_chunk(c, ...)`` writes all rows of targets
    ``target_slice(c)`` (whole weight chunks in one column) and then sets ``done[c]``.
    DM-Direct reads a few rows over all targets with :meth:`read_weight_rows`.
    """

    def __init__(self, store: AttributionStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        g = store.group[prefix]
        self.attrs = dict(g.attrs)
        self.target_chunk = int(self.attrs["target_chunk"])
        self.row_chunk = int(self.attrs["row_chunk"])
        self.config = self.attrs.get("config", {})
        self.weight = store.zarr_array(f"{prefix}/weight")
        self.bias = store.zarr_array(f"{prefix}/bias")
        self.lam = store.zarr_array(f"{prefix}/lam")
        self.lds = store.zarr_array(f"{prefix}/lds")
        self.lds_margin = store.zarr_array(f"{prefix}/lds_margin")
        self.done = store.zarr_array(f"{prefix}/done")
        self.num_chunks = self.done.shape[0]

    def __repr__(self) -> str:
        return f"FitGroup({self.prefix!r}, {len(self.completed_chunks())}/{self.num_chunks} target chunks)"

    def target_slice(self, chunk: int) -> slice:
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or not 0 <= chunk < self.num_chunks:
            raise StoreError(f"target chunk {chunk!r} out of range [0, {self.num_chunks}); fix: use missing_chunks()")
        n = self.store.spec.n_points
        return slice(int(chunk) * self.target_chunk, min((int(chunk) + 1) * self.target_chunk, n))

    def completed_chunks(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(np.asarray(self.done[:], dtype=bool))]

    def missing_chunks(self) -> list[int]:
        done = set(self.completed_chunks())
        return [c for c in range(self.num_chunks) if c not in done]

    def is_complete(self) -> bool:
        return not self.missing_chunks()

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

    def read_weight_rows(self, rows: Sequence[int] | np.ndarray, targets: slice | None = None) -> np.ndarray:
        """β rows for training points ``rows`` (len(rows) × targets × k): what DM-Direct sums over F."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= self.store.spec.n_train)):
            raise StoreError(f"rows must be train indices in [0, {self.store.spec.n_train}); fix: pass forget-set indices")
        t = slice(None) if targets is None else targets
        if rows.size == 0:
            return np.asarray(self.weight[0:0, t, :])
        return np.asarray(self.weight.oindex[rows, t, :])

    def read_bias(self, targets: slice | None = None) -> np.ndarray:
        return np.asarray(self.bias[slice(None) if targets is None else targets])
