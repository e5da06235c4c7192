"""The attribution store: one Zarr v3 group per (dataset fingerprint, model, recipe).

Every stage reads and writes through this module (DESIGN.md §4). The store lives
on a local path or any fsspec URL (:mod:`attribution.store_zarr`); its identity is a
:class:`~attribution.store_spec.StoreSpec`; β lives in fit groups (:mod:`attribution.fit_group`).

Rules the code enforces:

* The root attributes name what the store was built for (``StoreSpec``). Opening
  it for a different dataset fingerprint, model, recipe, alpha, seed, block size
  or shape raises ``StoreMismatch`` *before anything is written* (the check runs
  on a read-only handle).
* Writers write whole chunks they own: a subset block is exactly one chunk of
  ``subsets/masks`` and one shard of ``subsets/logits`` (:mod:`attribution.subset_blocks`); a fit target-chunk is one
  column of ``<prefix>/weight`` chunks (its row-major copy ``<prefix>/weight_rows`` is
  written after the last chunk, attr ``complete`` last). The block's marker (its own one-element
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

from typing import Any

import numpy as np
import zarr
from zarr.errors import ContainsGroupError

from .fit_group import FIT_PREFIXES, FitGroup, create_fit_group, fit_group_attrs, open_fit_group
from .store_spec import (
    SCHEMA_VERSION,
    SPEC_KEYS,
    STORE_KIND,
    StoreError,
    StoreMismatch,
    StoreSpec,
    schema_table,
    spec_diff,
)
from .subset_blocks import SubsetBlocks, check_num_models, ensure_subset_layout, shrink_message
from .store_zarr import (
    ARRAY_CONFIG,
    COMPRESSORS,
    array_attrs,
    get_array,
    make_store,
    normalize_url,
    open_root_group,
    path_is_nonempty_nonstore,
)

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

_ORIGINAL = "original/logits"


# --------------------------------------------------------------------------- the store


class AttributionStore(SubsetBlocks):
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
        url = normalize_url(url)
        if not isinstance(spec, StoreSpec):
            raise StoreError(f"spec must be a StoreSpec, got {type(spec).__name__}; fix: build a StoreSpec")
        num_models = check_num_models(num_models)
        for _attempt in range(2):
            ro = open_root_group(url)
            if ro is not None:
                cls._validate_root(url, dict(ro.attrs))
                diff = spec_diff(dict(ro.attrs), spec.to_attrs())
                if diff:
                    raise StoreMismatch(
                        f"store {url} was built for a different request: {'; '.join(diff)}; "
                        "fix: use a new --store path (one store per dataset fingerprint, model and recipe) "
                        "or rerun with the store's settings"
                    )
                have = int(ro.attrs.get("num_models_requested", 0))
                if num_models < have:
                    raise StoreError(shrink_message(url, num_models, have))
                rw = zarr.open_group(make_store(url, read_only=False), mode="r+", zarr_format=3)
                store = cls.__new__(cls)
                store.url, store.mode, store._group = url, "r+", rw
                ensure_subset_layout(rw, StoreSpec.from_attrs(dict(ro.attrs)), have or num_models)
                store._load()
                store.ensure_capacity(num_models)
                return store
            if path_is_nonempty_nonstore(url):
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
                    make_store(url, read_only=False), attributes=attrs, overwrite=False, zarr_format=3
                )
            except ContainsGroupError:
                continue  # someone created it concurrently: go round and check it
            store = cls.__new__(cls)
            store.url, store.mode, store._group = url, "r+", group
            ensure_subset_layout(group, spec, num_models)
            _create_original_logits(group, spec)  # here, once: a first deletion request then only writes it
            store._load()
            return store
        raise StoreError(f"could not create or open {url} (concurrent creation?); fix: rerun the command")

    @classmethod
    def open(cls, url: str, mode: str = "r") -> "AttributionStore":
        """Open an existing store; ``mode`` is ``"r"`` (read-only) or ``"r+"`` (write blocks)."""
        if mode not in ("r", "r+"):
            raise StoreError(f"mode must be 'r' or 'r+', got {mode!r}; fix: use open_or_create to create a store")
        url = normalize_url(url)
        group = open_root_group(url, read_only=mode == "r")
        if group is None:
            raise StoreError(f"no attribution store at {url}; fix: run `dmm estimate` (or check the --store path)")
        return cls(url, group, mode)  # checks the root attributes before anything can be written

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
            make_store(self.url, read_only=self.mode == "r"), mode=self.mode, zarr_format=3
        )
        self._load()

    @staticmethod
    def _validate_root(url: str, attrs: dict) -> None:
        if attrs.get("kind") != STORE_KIND or "schema_version" not in attrs:
            raise StoreError(f"{url} is a Zarr group but not an attribution store; fix: pass an attribution store path")
        if attrs["schema_version"] != SCHEMA_VERSION:
            raise StoreError(
                f"store {url} has schema version {attrs['schema_version']!r}, this code reads {SCHEMA_VERSION}; "
                "fix: rebuild the store with this version or use the matching dmm-pipeline version"
            )
        missing = [k for k in SPEC_KEYS if k not in attrs]
        if missing:
            raise StoreError(f"store {url} lacks root attributes {missing}; fix: rebuild the store")

    def _load(self) -> None:
        attrs = dict(self._group.attrs)
        self._validate_root(self.url, attrs)
        self.attrs = attrs
        self.spec = StoreSpec.from_attrs(attrs)
        self._subsets = None  # opened and checked on first use (`SubsetBlocks`)

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

    def check(self, **expected: Any) -> None:
        """Raise ``StoreMismatch`` naming every root attribute that differs from ``expected``."""
        unknown = [k for k in expected if k not in self.attrs]
        if unknown:
            raise StoreError(f"check() got unknown store attributes {unknown}; fix: use one of {sorted(self.attrs)}")
        diff = spec_diff(self.attrs, expected)
        if diff:
            raise StoreMismatch(
                f"store {self.url} does not match: {'; '.join(diff)}; "
                "fix: use the store built for this dataset/model/recipe or a new --store path"
            )

    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise StoreError(f"store {self.url} is open read-only; fix: AttributionStore.open(url, mode='r+')")

    # ---------------------------------------------------------------- generic access

    def zarr_array(self, path: str) -> zarr.Array:
        """The zarr array at ``path`` (e.g. for ``dask.array.from_zarr``). Raw: ignores markers."""
        arr = get_array(self._group, path)
        if arr is None:
            raise StoreError(f"no array {path!r} in store {self.url}; fix: run the stage that writes it")
        return arr

    def has(self, path: str) -> bool:
        return get_array(self._group, path) is not None

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
        arr = get_array(self._group, _ORIGINAL)
        if arr is None:  # a store created before the array was made with the store
            arr = _create_original_logits(self._group, s)
        elif arr.attrs.get("model_sha256") is not None:
            arr.attrs.update({"model_sha256": None})  # invalidate, then write, then name
        arr[...] = logits.astype(np.float32, copy=False)
        arr.attrs.update({"model_sha256": model_sha256})

    def original_model_sha256(self) -> str | None:
        arr = get_array(self._group, _ORIGINAL)
        return None if arr is None else arr.attrs.get("model_sha256")

    def read_original_logits(self, model_sha256: str | None = None) -> np.ndarray | None:
        """θ0's logits, or None if absent. Raises ``StoreMismatch`` if ``model_sha256`` differs."""
        arr = get_array(self._group, _ORIGINAL)
        if arr is None or arr.attrs.get("model_sha256") is None:
            return None
        have = arr.attrs["model_sha256"]
        if model_sha256 is not None and have != model_sha256:
            raise StoreMismatch(
                f"original logits in {self.url} belong to model {have[:16]}..., not {model_sha256[:16]}...; "
                "fix: pass that θ0 as --model of `dmm unlearn` (its first request writes θ0's logits), or use a new --store"
            )
        return np.asarray(arr[...])

    # ---------------------------------------------------------------- fit groups

    def create_fit_group(
        self, prefix: str, target_chunk: int, row_chunk: int, config: dict | None = None, overwrite: bool = False
    ) -> FitGroup:
        """Create (or reopen, if identical) the ``datamodels``/``trak`` group; see :func:`create_fit_group`."""
        return create_fit_group(self, prefix, target_chunk, row_chunk, config, overwrite)

    def fit_group(self, prefix: str) -> FitGroup:
        """Open an existing ``datamodels``/``trak`` group (StoreError if absent)."""
        return open_fit_group(self, prefix)

    def has_fit_group(self, prefix: str) -> bool:
        return fit_group_attrs(self, prefix) is not None

    # ---------------------------------------------------------------- status

    def summary(self) -> dict:
        """Everything `dmm status` prints: attributes, progress of each stage; a fit group for a target subset T
        also its spec (``targets``) and |T| (``fitted_targets``), one fitted for every point neither."""
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
                    "row_copy": fg.weight_rows is not None,
                    "config": fg.config,
                }
                if fg.targets.is_subset:
                    out[prefix].update(targets=fg.targets.spec, fitted_targets=fg.num_targets)
            else:
                out[prefix] = None
        return out


def _create_original_logits(group: zarr.Group, spec: StoreSpec) -> zarr.Array:
    """Driver: the empty ``original/logits`` array (model_sha256 None until a first request writes θ0's logits)."""
    shape = (spec.n_points, spec.num_classes)
    return group.create_array(
        _ORIGINAL, shape=shape, chunks=shape, dtype="float32", fill_value=float("nan"),
        compressors=COMPRESSORS, config=ARRAY_CONFIG,
        attributes=array_attrs(spec.fingerprint, "logits of the original model θ0", model_sha256=None),
    )
