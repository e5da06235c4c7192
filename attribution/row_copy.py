"""The row-major copy of a fit group's β: ``weight_rows``, one stored object per training row.

β is written per target chunk (``weight``: all rows of a few targets), but a deletion request needs a few
rows over all targets: read from ``weight``, that is |F| × ⌈p / target_chunk⌉ objects.  Once every chunk
is done the driver writes β again as ``weight_rows`` (chunk 1 × p × k, :func:`write_row_copy`), so a request
reads |F| objects and decodes them itself (:func:`decoded_rows`).  Its attr ``complete`` is set last and
cleared when the group is reopened to refit chunks (:func:`drop_row_copy`): readers then fall back to ``weight``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import BytesCodec

from .store_zarr import ARRAY_CONFIG, COMPRESSORS, array_attrs, fetch_objects, get_array

if TYPE_CHECKING:
    from .fit_group import FitGroup

ROWS = "weight_rows"  # the row-major copy of weight
ROW_CODECS = (BytesCodec(endian="little"), *COMPRESSORS)  # its codec chain, which `decoded_rows` decodes itself
COPY_BYTES = 64 << 20  # β bytes one copy task holds (a whole number of weight's row chunks, at least one)


def decoded_rows(arr: zarr.Array, rows: np.ndarray, start: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start + j, row j) of a ``weight_rows`` copy with ROW_CODECS, decoded here one after another into one buffer."""
    shape = arr.shape[1:]
    keys = [f"{arr.store_path.path}/{arr.metadata.encode_chunk_key((int(i), 0, 0))}" for i in rows]
    zstd, row = Zstd(), np.empty(shape, dtype="<f4")
    for j, raw in enumerate(fetch_objects(arr.store_path.store, keys), start):
        if raw is not None:  # absent: the fill value 0
            zstd.decode(raw, out=row)  # no allocation per row
            yield j, row


def drop_row_copy(group: "FitGroup") -> None:
    """Driver: mark ``weight_rows`` incomplete (readers fall back to ``weight``) until it is rewritten."""
    arr = get_array(group.store.group, f"{group.prefix}/{ROWS}")
    if arr is not None and arr.attrs.get("complete") is not False:
        arr.attrs.update({"complete": False})
    group.weight_rows = None


def write_row_copy(group: "FitGroup", scheduler="threads", **compute_kwargs) -> bool:
    """Driver: write ``weight_rows`` (chunk 1 × p × k) of a complete group lacking a complete one; True if written.

    Out of core: Dask tasks of whole row chunks of ``weight`` (about COPY_BYTES each) read β and write
    their own rows, on ``scheduler`` (a Dask scheduler name or ``get``); ``complete`` is set after the last.
    """
    import dask.array as da

    group.store._require_writable()
    if not group.is_complete() or group.row_copy() is not None:
        return False
    n, p, k = group.weight.shape
    rows = group.store.group.create_array(
        f"{group.prefix}/{ROWS}", shape=(n, p, k), chunks=(1, p, k), dtype="float32", fill_value=0.0,
        compressors=COMPRESSORS, config=ARRAY_CONFIG, overwrite=True,
        attributes=array_attrs(group.store.fingerprint, "weight again, one chunk per training row; "
                               "read only when complete", complete=False),
    )
    step = group.row_chunk * max(1, COPY_BYTES // (group.row_chunk * p * k * 4))
    beta = da.from_zarr(group.weight, chunks=(min(step, n), p, k), inline_array=True)
    da.store(beta, rows, lock=False, scheduler=scheduler, **compute_kwargs)
    rows.attrs.update({"complete": True})
    group.weight_rows = group.row_copy()
    return True
