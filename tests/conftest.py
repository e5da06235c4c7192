"""Shared fixtures: token auth for every Ray the suite starts (`ray_token`), one local Ray for the
whole suite (`ray_session`), a real `ray start --head` cluster on 127.0.0.1 (`ray_head`), the
`dmm` command line as a subprocess (`run_dmm`), and one torch thread per module (`one_torch_thread`).

Thread count: `DMM_TEST_THREADS=N` runs every test, and every `dmm` subprocess (OMP_NUM_THREADS), with
N torch threads, `one_torch_thread` modules included: `DMM_TEST_THREADS=1 make test` and
`DMM_TEST_THREADS=2 make test` must both pass. Unset, tests run with torch's default and
`one_torch_thread` modules with 1. Every test gets the thread count back as it was before it ran.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def _test_threads() -> int | None:
    """The suite's torch thread count from DMM_TEST_THREADS (None when unset)."""
    value = os.environ.get("DMM_TEST_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"DMM_TEST_THREADS={value!r} is not a positive integer; use e.g. DMM_TEST_THREADS=2")
    return int(value)


def pytest_configure(config):
    threads = _test_threads()
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # `dmm` subprocesses start with the same count
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _torch_threads_per_test():
    """DMM_TEST_THREADS threads for the test (if set); a test may change the count, it is restored after."""
    before = torch.get_num_threads()
    threads = _test_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (DMM_TEST_THREADS threads when set): its models and solves are
    tiny, and on a shared 2-core machine torch's threads wait for a free core at every call (up to 10x
    slower). Its tests must pass with any thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(_test_threads() or 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_token(tmp_path_factory):
    """A fresh token in a file named by RAY_AUTH_TOKEN_PATH: no test reads or writes ~/.ray/auth_token.

    RAY_ADDRESS is cleared so nothing joins a cluster by accident; the environment is restored after.
    """
    saved = {k: os.environ.pop(k, None) for k in AUTH_VARS}
    path = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    path.write_text(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    yield path
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session(ray_token):
    """One local Ray for every test (2 CPUs, 100 MB object store, no dashboard); yields its address.

    Token auth is on (Ray's default for a local start, token from `ray_token`); workers can import
    the project and `tests.*` modules. Workers' and the raylet's log lines stay in Ray's log files
    (`log_to_driver=False`): forwarded, they land in this process's stderr at any moment (e.g. the
    raylet's "disk over 95% full" warning), inside the one-line errors that tests read there.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def run_dmm():
    """Run `dmm ARGS…` in a subprocess (project root as cwd); returns the CompletedProcess."""
    def run(args, env=None, timeout=300):
        return subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout)
    return run


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_process_tree(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM a process and all its descendants, SIGKILL whatever is left after `grace` seconds."""
    import ray  # noqa: F401 - puts Ray's vendored psutil on sys.path
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=grace)


def _wait_for_job_api(url: str, token: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`ray start --head` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"the job API at {url} did not come up in {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def ray_head(ray_token):
    """A real `ray start --head --block` cluster with token auth; yields its job API URL on 127.0.0.1.

    The dashboard listens on 127.0.0.1 only; Ray binds its GCS and raylet to the node's routable IP
    whatever it is told (token auth guards them). Stopped by signalling only its own process tree:
    `ray stop` would stop every Ray on the machine, `ray_session` and other users' included.
    """
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = free_ports(9)
    temp_dir = Path(tempfile.mkdtemp(prefix="dmmray", dir="/tmp"))  # short: Ray's socket paths are length-limited
    log = temp_dir / "ray-start.log"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", "--num-cpus=2", f"--object-store-memory={100 * 2**20}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_job_api(url, ray_token.read_text().strip(), proc, log)
        yield url
    finally:
        stop_process_tree(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def training_ids(monkeypatch) -> list[set[int]]:
    """The id set every training run of the test draws its minibatches from, in order (a spy on
    `engine.epoch_permutations`, which every trainer calls): to check that no forgotten id is seen."""
    import attribution.engine as engine

    seen, real = [], engine.epoch_permutations

    def recording(indices, epochs, order_seed):
        seen.append(set(indices.tolist()))
        return real(indices, epochs, order_seed)

    monkeypatch.setattr(engine, "epoch_permutations", recording)
    return seen
