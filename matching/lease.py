"""A lease: one writer at a time on a store behind an fsspec URL, where no file lock exists.

The lease is an object beside the store (`<store>.lock`) holding a JSON token. A writer takes it by
creating the object only if absent (`open(path, "xb")`), then waits `SETTLE_S` and reads it back:
it holds the lease only if its own token is still there (a backend whose exclusive create is not
atomic lets two writers create it; the later write wins and the earlier writer sees a foreign
token; this assumes that such a racing create lands within `SETTLE_S`). The holder renews the
lease (a new `beat`) every `STALE_S / 6` seconds. A waiter that sees the same content for
`STALE_S` seconds of its own clock (no clock is compared across hosts) takes the lease as
abandoned by a crashed holder, deletes it and competes again.

Before writing, the holder calls `check()`: it raises if the object no longer holds its token (a
holder frozen for over `STALE_S` can lose its lease), so a lost lease refuses before any write.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from fsspec.core import url_to_fs

from .errors import MatchingError

SETTLE_S = 1.0   # wait between creating the lease and reading it back
STALE_S = 60.0   # unchanged this long (a waiter's clock): the holder is gone
POLL_S = 0.2     # waiters look again this often


def busy_error(store_url: str, timeout: float, holder: str = "") -> MatchingError:
    """The one-line error of a request that waited `timeout` seconds for another one on the same store."""
    return MatchingError(f"store {store_url} is busy with another request{holder} for over {timeout:g} s; "
                         "rerun when it is done or raise --lock-timeout")


class Lease:
    """The lease of the store at fsspec URL `store_url`: `acquire(timeout)`, `check()`, `release()`."""

    def __init__(self, store_url: str) -> None:
        self.store_url, self.url = store_url, store_url.rstrip("/") + ".lock"
        self._fs, self._path = url_to_fs(self.url)
        self._content: bytes | None = None
        self._mutex = threading.Lock()  # heartbeat vs check/release
        self._stop = threading.Event()
        self._beat_thread: threading.Thread | None = None

    def _read(self) -> bytes | None:
        try:
            return self._fs.cat_file(self._path)
        except FileNotFoundError:
            return None

    def _body(self, token: str, beat: int) -> bytes:
        return json.dumps({"token": token, "beat": beat, "host": socket.gethostname(), "pid": os.getpid()}).encode()

    def _try_create(self, body: bytes) -> bool:
        try:
            with self._fs.open(self._path, "xb") as f:
                f.write(body)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError) as e:  # a filesystem without mode "xb"
            raise MatchingError(f"cannot create the lease {self.url} only if absent ({type(e).__name__}: {e}); "
                                "make requests on a copy of the store on a local path or a filesystem "
                                "with exclusive create") from None
        time.sleep(SETTLE_S)
        return self._read() == body

    def acquire(self, timeout: float) -> None:
        """Hold the lease, waiting `timeout` seconds at most (then a one-line MatchingError)."""
        body = self._body(uuid.uuid4().hex, 0)
        deadline = time.monotonic() + timeout
        seen, seen_at = None, time.monotonic()
        while not self._try_create(body):
            now = time.monotonic()
            current = self._read()
            if current != seen:
                seen, seen_at = current, now
            elif current is not None and now - seen_at >= STALE_S:
                self._break(current)
                continue
            if now >= deadline:
                raise busy_error(self.store_url, timeout, f" ({_holder(current)}, lease {self.url})")
            time.sleep(POLL_S)
        self._content = body
        self._stop.clear()
        self._beat_thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat_thread.start()

    def _break(self, stale: bytes) -> None:
        """Delete an abandoned lease, unless someone renewed or replaced it meanwhile."""
        if self._read() == stale:
            try:
                self._fs.rm_file(self._path)
            except FileNotFoundError:
                pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(STALE_S / 6):
            with self._mutex:
                if self._content is None or self._read() != self._content:
                    return  # lost: check() says so
                raw = json.loads(self._content)
                self._content = self._body(raw["token"], raw["beat"] + 1)
                self._fs.pipe_file(self._path, self._content)

    def check(self) -> None:
        """Raise unless this process still holds the lease (call right before writing)."""
        with self._mutex:
            current = self._read()
            if self._content is None or current != self._content:
                raise MatchingError(f"lost the lease {self.url} to another request ({_holder(current)}) before "
                                    "writing; nothing was written: rerun the request")

    def release(self) -> None:
        """Stop renewing and delete the lease object if it is still this process's."""
        self._stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join()
        with self._mutex:
            if self._content is not None and self._read() == self._content:
                self._fs.rm_file(self._path)
            self._content = None


def _holder(content: bytes | None) -> str:
    """Who holds a lease, from its content, for error messages."""
    try:
        raw = json.loads(content or b"")
        return f"held by pid {raw['pid']} on {raw['host']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
