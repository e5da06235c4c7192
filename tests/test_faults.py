"""Fault tests on real Ray: a worker killed mid-block, transient and input errors in a task, the
driver SIGKILLed mid-job and rerun, and job submission to a real `ray start --head` cluster."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import psutil  # Ray's vendored copy, on sys.path once ray is imported

from attribution.datasets import load_dataset
from attribution.errors import DmmError
from attribution.models import mlp
from attribution.store import AttributionStore
from cluster.estimate import EstimateRequest, run_estimate

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ models that fail inside a task

def scratch() -> Path:
    """A directory shared by this test run and its Ray workers (keyed by the cluster's address)."""
    key = hashlib.sha256(ray.get_runtime_context().gcs_address.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"dmm-faults-{key}"
    path.mkdir(exist_ok=True)
    return path


def flaky_mlp(input_shape, num_classes):
    """The mlp, except that the first build after the test arms it raises a transient OSError."""
    try:
        (scratch() / "armed").unlink()
    except FileNotFoundError:
        return mlp(input_shape, num_classes)
    raise OSError("injected transient I/O error")


def invalid_mlp(input_shape, num_classes):
    """An input error: counted, then raised (it must not be retried)."""
    with open(scratch() / "invalid-calls", "a") as f:
        f.write("x\n")
    raise DmmError("injected input error; fix the input")


def test_a_transient_error_is_retried(ray_session, tmp_path):
    (scratch() / "armed").touch()
    request = EstimateRequest.build("digits", "tests.test_faults:flaky_mlp", "digits-mlp", epochs=2, block_size=4)
    result = run_estimate(request, tmp_path / "s", 4, progress=False)
    assert not (scratch() / "armed").exists()  # the error did happen
    assert result.store.completed_models() == 4


def test_an_input_error_fails_at_once_on_one_line(ray_session, tmp_path):
    (scratch() / "invalid-calls").unlink(missing_ok=True)
    request = EstimateRequest.build("digits", "tests.test_faults:invalid_mlp", "digits-mlp", epochs=2, block_size=4)
    with pytest.raises(DmmError, match="^injected input error; fix the input$"):
        run_estimate(request, tmp_path / "s", 4, progress=False)
    assert (scratch() / "invalid-calls").read_text() == "x\n"
    assert AttributionStore.open(tmp_path / "s").completed_models() == 0


# ------------------------------------------------------------------ (a) a worker dies mid-block

def kill_first_block_worker(killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first Ray worker of this test run seen executing `train_block` (its proctitle)."""
    me = psutil.Process()
    while not stop.is_set():
        for p in me.children(recursive=True):
            try:
                if p.cmdline()[:1] == ["ray::train_block"]:
                    p.send_signal(signal.SIGKILL)
                    killed.append(p.pid)
                    return
            except psutil.Error:
                continue
        time.sleep(0.01)


def test_a_worker_killed_mid_block_is_retried_and_every_row_is_right(ray_session, tmp_path):
    request = EstimateRequest.build("digits", block_size=4, seed=7)  # full recipe: ~0.3 s per block
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=kill_first_block_worker, args=(killed, stop))
    killer.start()
    try:
        result = run_estimate(request, tmp_path / "s", 32, progress=False)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was seen executing a block"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    masks, logits, blocks = result.store.read()
    n = load_dataset("digits").n_train
    assert blocks == list(range(8))
    assert np.array_equal(masks, np.concatenate([request.block_subsets(b, n)[0] for b in blocks]))
    assert np.isfinite(logits).all() and np.abs(logits).sum(axis=(1, 2)).min() > 0  # every row written


# ------------------------------------------------------------------ (b) the driver dies mid-job

def test_a_killed_driver_resumes_where_it_stopped(ray_session, ray_token, tmp_path, run_dmm):
    args = ["estimate", "--dataset", "digits", "--num-models", "64", "--block-size", "4", "--seed", "5",
            "--store", tmp_path / "s"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    driver = subprocess.Popen([sys.executable, "-m", "cluster.cli", *map(str, args)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # the default path: a local Ray started in-process, killed together with its driver
        done_at_kill = wait_for_some_blocks(tmp_path / "s", driver)
        tree = psutil.Process(driver.pid).children(recursive=True)
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:  # workers in their own sessions
        p.kill()
    assert 0 < done_at_kill < 16

    missing = AttributionStore.open(tmp_path / "s").missing_blocks()
    assert missing
    rerun = run_dmm(args, env={**env, "RAY_ADDRESS": ray_session})  # the same command, on the running Ray
    assert rerun.returncode == 0, rerun.stderr
    assert f"trained {len(missing)} blocks, skipped {16 - len(missing)}" in rerun.stdout
    clean = run_estimate(EstimateRequest.build("digits", block_size=4, seed=5), tmp_path / "clean", 64,
                         progress=False)
    resumed = AttributionStore.open(tmp_path / "s")
    (m1, l1, b1), (m2, l2, b2) = resumed.read(), clean.store.read()
    assert b1 == b2 == list(range(16))
    assert np.array_equal(m1, m2) and np.array_equal(l1, l2)


def wait_for_some_blocks(store: Path, driver: subprocess.Popen, timeout: float = 240.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, f"the driver exited early with {driver.returncode}"
        try:
            done = len(AttributionStore.open(store).completed_blocks())
        except DmmError:
            done = 0  # not created yet
        if done:
            return done
        time.sleep(0.02)
    pytest.fail("no block completed in time")


# ------------------------------------------------------------------ (c) job submission

def test_submit_runs_estimate_on_a_real_cluster_with_token_auth(ray_head, ray_token, tmp_path, run_dmm):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}  # token file only
    submitted = run_dmm(["submit", "--address", ray_head, "--", "estimate", "--dataset", "digits",
                         "--num-models", "8", "--block-size", "4", "--epochs", "2", "--store", tmp_path / "s"],
                        env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    logs = run_dmm(["submit", "--address", ray_head, "--logs", job_id], env=env)
    assert logs.returncode == 0, logs.stdout + logs.stderr
    assert "trained 2 blocks, skipped 0" in logs.stdout
    assert logs.stdout.strip().endswith(f"job {job_id}: SUCCEEDED")
    assert AttributionStore.open(tmp_path / "s").completed_models() == 8

    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"} | {"HOME": str(tmp_path)}
    refused = run_dmm(["submit", "--address", ray_head, "--logs", job_id], env=no_token)
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"dmm: error: Ray job API at {ray_head}: ") and "RAY_AUTH_TOKEN" in refused.stderr
    assert refused.stderr.count("\n") == 1
