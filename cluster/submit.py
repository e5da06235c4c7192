"""`dmm submit`: run a `dmm` command on a cluster through Ray's job submission API, follow its logs.

The job's entrypoint is the same `dmm …` command line; on the cluster, Ray sets RAY_ADDRESS for
it, so `dmm estimate` there joins that cluster. The cluster's nodes need dmm-pipeline installed,
and paths in the command (e.g. `--store`) are read on the cluster.
"""
from __future__ import annotations

import asyncio
import shlex
from contextlib import contextmanager
from typing import Iterator

from ray.job_submission import JobStatus, JobSubmissionClient

from .ray_runtime import TOKEN_HELP, RayConnectError, first_line, ray_errors, use_cluster_token


@contextmanager
def job_api(address: str | None) -> Iterator[JobSubmissionClient]:
    """A client of the cluster's dashboard (`http://HOST:8265`; None: RAY_API_SERVER_ADDRESS/RAY_ADDRESS);
    its failures become one-line errors."""
    use_cluster_token()
    try:
        yield JobSubmissionClient(address)
    except ray_errors() as e:  # HTTP, auth, address, unknown job id
        raise RayConnectError(f"Ray job API at {address or '$RAY_ADDRESS'}: {first_line(e)}; "
                              f"fix: check --address http://HOST:8265 (and the job id), and {TOKEN_HELP}") from None


def submit(address: str | None, argv: list[str]) -> str:
    """Submit `dmm ARGV…` as a Ray job; returns the job id."""
    with job_api(address) as client:
        return client.submit_job(entrypoint=shlex.join(["dmm", *argv]))


def follow(address: str | None, job_id: str) -> JobStatus:
    """Print the job's logs as they come until it ends; returns its final status."""
    with job_api(address) as client:
        client.get_job_status(job_id)  # an unknown id fails here, with the server's message

        async def tail() -> None:
            async for lines in client.tail_job_logs(job_id):
                print(lines, end="", flush=True)

        asyncio.run(tail())
        return client.get_job_status(job_id)
