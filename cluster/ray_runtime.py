"""Where a stage's Ray tasks run (DESIGN.md §6): a local Ray started in-process, or a cluster.

The address comes from `--address`, else `RAY_ADDRESS`; with neither, a local Ray is started in
this process and stops with it. Clusters run with token authentication: a client presents the
cluster's token from `RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH`, or
`~/.ray/auth_token` (Ray's own precedence). Ray only sends it to an explicit address when
`RAY_AUTH_MODE=token`, so `use_cluster_token` turns that on whenever a token is at hand.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from attribution.errors import DmmError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TOKEN_HELP = ("pass the cluster's token in RAY_AUTH_TOKEN, or in a file named by RAY_AUTH_TOKEN_PATH "
              "or at ~/.ray/auth_token")


class RayConnectError(DmmError):
    """The cluster cannot be reached or refuses us; the message names the fix."""


def ray_errors() -> tuple[type[BaseException], ...]:
    """What a failed connection or job call raises: network, auth, address (Ray is imported here, not at import)."""
    import ray

    return OSError, RuntimeError, ValueError, ray.exceptions.RayError


def first_line(e: BaseException) -> str:
    """An exception as one line of an error message."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def cluster_address(address: str | None) -> str | None:
    """The explicit `--address`, else `RAY_ADDRESS`, else None (start a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def use_cluster_token() -> bool:
    """Send the token to explicit addresses when one is available and RAY_AUTH_MODE is unset.

    Ray does this itself only for a local cluster it finds on its own (address None/"auto"); this
    is the same switch (environment variable plus a refresh of Ray's cached config).
    """
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def connect(address: str | None = None) -> None:
    """Attach this process to Ray: reuse a running connection, join a cluster, or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(address)
    if address is None:
        pythonpath = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
        ray.init(include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        return
    use_cluster_token()
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ray_errors() as e:
        raise RayConnectError(f"cannot join the Ray cluster at {address} ({first_line(e)}); fix: check "
                              f"--address/RAY_ADDRESS and {TOKEN_HELP}") from None
