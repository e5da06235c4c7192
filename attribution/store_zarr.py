"""Zarr plumbing shared by the store and its fit groups: URLs, codecs, array handles.

A store lives on a plain local path (``zarr.storage.LocalStore``) or on any fsspec URL
such as ``memory://x`` / ``file:///x`` / ``s3://bucket/x`` (``zarr.storage.FsspecStore``).
Every array uses one fixed codec chain, so the same data always gives the same bytes.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import FsspecStore, LocalStore

from .store_spec import SCHEMA_VERSION, StoreError

# One fixed codec chain for every array: same data -> same bytes, whatever zarr's
# defaults become. (bytes serializer is zarr's default for fixed-size dtypes.)
COMPRESSORS = (ZstdCodec(level=3, checksum=False),)
ARRAY_CONFIG = {"write_empty_chunks": True}  # every owned chunk exists as an object


def has_scheme(url: str) -> bool:
    """True for an fsspec URL (``memory://x``, ``s3://b/x``, ``simplecache::...``), False for a path."""
    return "://" in url or "::" in url


def normalize_url(url: str | os.PathLike) -> str:
    """An fsspec URL as given, a local path made absolute (the form every worker can open)."""
    url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise StoreError(f"store URL must be a non-empty path or fsspec URL, got {url!r}; fix: pass --store PATH")
    if has_scheme(url):
        return url
    return str(Path(url).expanduser().absolute())


def make_store(url: str, read_only: bool):
    """The zarr store object for ``url``: ``FsspecStore`` for a URL, ``LocalStore`` for a path."""
    if has_scheme(url):
        # fsspec's LocalFileSystem does not create parent dirs unless asked to
        opts = {"auto_mkdir": True} if url.startswith(("file://", "local://")) else None
        return FsspecStore.from_url(url, storage_options=opts, read_only=read_only)
    return LocalStore(url, read_only=read_only)


def path_is_nonempty_nonstore(url: str) -> bool:
    """True if something that is not a zarr store already sits at ``url``."""
    if has_scheme(url):
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


def open_root_group(url: str, read_only: bool = True) -> zarr.Group | None:
    """Root group (opening writes nothing, in either mode), or None if there is no zarr group at ``url``."""
    if not read_only and not has_scheme(url) and not Path(url).is_dir():
        return None  # a writable LocalStore would create the folder on opening
    try:
        return zarr.open_group(make_store(url, read_only=read_only), mode="r" if read_only else "r+", zarr_format=3)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        return None
    except (ValueError, KeyError, OSError) as exc:
        raise StoreError(f"cannot read {url} as a Zarr v3 group ({exc}); fix: point --store at an attribution store") from None


def array_attrs(fingerprint: str, meaning: str, **extra: Any) -> dict:
    return {"fingerprint": fingerprint, "schema_version": SCHEMA_VERSION, "meaning": meaning, **extra}


def get_array(group: zarr.Group, path: str) -> zarr.Array | None:
    try:
        node = group[path]
    except KeyError:
        return None
    if not isinstance(node, zarr.Array):
        return None
    return node.with_config(ARRAY_CONFIG)


def fetch_objects(zstore, keys: list[str]) -> list[bytes | None]:
    """The stored bytes of ``keys`` (None where absent), no codec work: read in this thread from a local store
    (a key is the file ``root/key``; Zarr's event loop and its thread hops cost more than reading a small
    file), fetched concurrently from any other store, one call each."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    if isinstance(zstore, LocalStore):
        return [_read_file(Path(zstore.root) / key) for key in keys]

    async def fetch():
        got = await asyncio.gather(*(zstore.get(key, prototype=default_buffer_prototype()) for key in keys))
        return [None if b is None else b.to_bytes() for b in got]

    return sync(fetch())


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def delete_dir(group: zarr.Group, prefix: str) -> None:
    """Delete every key under ``prefix`` in the group's store (used to refit a fit group)."""
    from zarr.core.sync import sync

    sync(group.store.delete_dir(prefix))
