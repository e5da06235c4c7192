"""`dmm estimate --gpus-per-task G` on CPU: a real `ray start --head` with 2 fake GPUs, the workers forced to
the CPU (DMM_FORCE_DEVICE=cpu); one GPU worker per GPU slot, the dataset loaded once per worker, the CPU
path's bytes; GPU task sizes no node has are refused before the store exists; the device rules."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import ray
import torch

from attribution.datasets import load_dataset
from attribution.device import DeviceError, forced_cpu, gpu_worker_device
from attribution.errors import DmmError
from attribution.store import AttributionStore
from cluster.cli import main
from cluster.estimate import EstimateRequest, run_estimate, train_block, worker_slots
from conftest import BIN, ROOT, free_ports, stop_process_tree
from fixtures_store import tree_hashes

REQUEST = dict(epochs=2, block_size=2)  # 6 blocks of 12 models, ~0.1 s each
WORKER_LINE = re.compile(r"^estimate: GPU worker (\d+)/(\d+) on node \S+, pid (\d+): Ray GPU ids \[(\d+)\], "
                         r"computing on cpu \(DMM_FORCE_DEVICE=cpu\)$")
SUMMARY_LINE = re.compile(r"^estimate: GPU worker (\d+)/(\d+) trained (\d+) blocks on cpu, Ray GPU ids \[(\d+)\]; "
                          r"dataset loaded onto it (\d+) time\(s\)$")


def test_fractional_gpus_on_a_cluster_without_gpus_are_refused_before_the_store_exists(ray_session, tmp_path,
                                                                                      capsys):
    if any(n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]):
        pytest.skip("this Ray has GPUs")
    args = ["estimate", "--dataset", "digits", "--num-models", "4", "--block-size", "4", "--epochs", "2",
            "--store", str(tmp_path / "s"), "--gpus-per-task", "0.5"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("dmm: error: no node of the Ray cluster has 1 CPUs and 0.5 GPUs") and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_a_gpu_fraction_finer_than_ray_allows_is_refused_before_anything(tmp_path):
    with pytest.raises(DmmError, match="^--cpus-per-task 1 / --gpus-per-task 1e-05: .*0.0001; fix the resources$"):
        run_estimate(EstimateRequest.build("digits", **REQUEST), tmp_path / "s", 4, gpus_per_task=0.00001)
    assert not (tmp_path / "s").exists()


def test_a_bad_forced_device_is_refused_before_the_store_exists(monkeypatch, tmp_path):
    monkeypatch.setenv("DMM_FORCE_DEVICE", "cuda")
    with pytest.raises(DeviceError, match="^DMM_FORCE_DEVICE='cuda' is not supported; set DMM_FORCE_DEVICE=cpu"):
        run_estimate(EstimateRequest.build("digits", **REQUEST), tmp_path / "s", 4, gpus_per_task=1)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("value, forced", [(None, False), ("", False), ("cpu", True), (" cpu ", True)])
def test_forced_cpu_reads_dmm_force_device(monkeypatch, value, forced):
    monkeypatch.delenv("DMM_FORCE_DEVICE", raising=False)
    if value is not None:
        monkeypatch.setenv("DMM_FORCE_DEVICE", value)
    assert forced_cpu() is forced


def test_a_gpu_worker_computes_on_its_gpu_or_the_forced_cpu(monkeypatch):
    assert gpu_worker_device(["0"], force_cpu=True) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_worker_device(["3"]) == torch.device("cuda", 0)  # Ray shows the worker GPU 3 as its cuda:0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"^Ray assigned GPU\(s\) \['3'\] but torch .* has no CUDA; fix: .*"
                                          "DMM_FORCE_DEVICE=cpu$"):
        gpu_worker_device(["3"])
    with pytest.raises(DeviceError, match="assigned no GPU"):
        gpu_worker_device([])


@pytest.mark.parametrize("cpus, gpus, slots", [(1, 0, 10), (1, 1, 4), (1, 0.5, 6), (2, 0.5, 5), (0.5, 0.25, 12),
                                               (1, 0.3, 8), (9, 0, 0), (1, 5, 0)])
def test_worker_slots_count_the_scarcer_resource_per_node(cpus, gpus, slots):
    nodes = [{"CPU": 8, "GPU": 2}, {"CPU": 2, "GPU": 4, "memory": 1e9}, {"CPU": 0.0}]
    # by hand: min(8 / cpus, 2 / gpus) + min(2 / cpus, 4 / gpus) + 0, each floored; no GPU needed: CPUs alone
    assert worker_slots(nodes, cpus, gpus) == slots


def test_worker_slots_are_not_lost_to_float_rounding():
    assert 0.3 / 0.1 < 3
    assert worker_slots([{"CPU": 8, "GPU": 0.3}], 1, 0.1) == 3


@pytest.fixture(scope="module")
def gpu_head(ray_token):
    """`ray start --head --block --num-gpus=2 --num-cpus=2` (token auth, no dashboard); yields its GCS address.

    Stopped by signalling only its own process tree, as conftest's `ray_head`. Its tests are the module's last."""
    gcs, agent, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr, client = free_ports(8)
    temp_dir = Path(tempfile.mkdtemp(prefix="dmmgpu", dir="/tmp"))  # short: Ray's socket paths are length-limited
    log = temp_dir / "ray-start.log"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--include-dashboard=false",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}", f"--ray-client-server-port={client}",
           "--num-cpus=2", "--num-gpus=2", f"--object-store-memory={100 * 2**20}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"{ray.util.get_node_ip_address()}:{gcs}"
    finally:
        stop_process_tree(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def cpu_path_store(path: Path) -> dict[str, str]:
    """The files the CPU task path writes for 12 models of REQUEST (what its tasks run, with 1 thread)."""
    request = EstimateRequest.build("digits", **REQUEST)
    store = AttributionStore.open_or_create(path, request.spec(load_dataset("digits")), 12)
    for block in store.missing_blocks():
        train_block(store, request, block, threads=1)
    return tree_hashes(path)


def estimate_on(head: str, run_dmm, store: Path, models: int, **env):
    """`dmm estimate` of `models` models of REQUEST on the cluster, G = C = 0.5, with `env` added."""
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "DMM_FORCE_DEVICE")}
    return run_dmm(["estimate", "--dataset", "digits", "--num-models", models, "--epochs", "2", "--block-size", "2",
                    "--store", store, "--address", head, "--gpus-per-task", "0.5", "--cpus-per-task", "0.5"],
                   env={**base, **env})  # the token from its file only


def test_blocks_run_on_one_gpu_worker_per_slot_with_the_cpu_paths_bytes(gpu_head, run_dmm, tmp_path):
    done = estimate_on(gpu_head, run_dmm, tmp_path / "s", 12, DMM_FORCE_DEVICE="cpu")
    assert done.returncode == 0, done.stderr
    assert "trained 6 blocks, skipped 0; 12/12 models" in done.stdout
    lines = done.stderr.splitlines()
    started = {int(k): (int(n), int(pid), int(gpu)) for k, n, pid, gpu in
               (m.groups() for m in map(WORKER_LINE.match, lines) if m)}
    summary = {int(k): (int(n), int(trained), int(gpu), int(loads)) for k, n, trained, gpu, loads in
               (m.groups() for m in map(SUMMARY_LINE.match, lines) if m)}
    # 0.5 of 2 fake GPUs and 0.5 of 2 CPUs per worker: 4 workers, two (and so two blocks at a time) on each GPU
    assert sorted(started) == sorted(summary) == [1, 2, 3, 4], done.stderr
    assert {n for n, _, _ in started.values()} == {n for n, *_ in summary.values()} == {4}
    assert len({pid for _, pid, _ in started.values()}) == 4
    assert sorted(gpu for *_, gpu in started.values()) == [0, 0, 1, 1]
    assert all(summary[k][2] == started[k][2] for k in started)
    assert all(trained >= 1 and loads == 1 for _, trained, _, loads in summary.values()), done.stderr
    assert sum(trained for _, trained, _, _ in summary.values()) == 6  # so a worker trained 2 blocks on 1 load
    assert tree_hashes(tmp_path / "s") == cpu_path_store(tmp_path / "cpu" / "s")


@pytest.mark.skipif(torch.cuda.is_available(), reason="here torch would compute on a real GPU")
def test_a_gpu_worker_uses_cuda_where_ray_assigns_a_gpu(gpu_head, run_dmm, tmp_path):
    """Not forced, a worker given a (fake) GPU computes on CUDA: this torch has none, so it is refused on one line."""
    refused = estimate_on(gpu_head, run_dmm, tmp_path / "s", 2)  # one block: one worker
    assert refused.returncode == 2, refused.stderr
    # Ray may log the actor's unhandled error after ours, so find our line rather than take the last one
    (ours,) = [line for line in refused.stderr.splitlines() if line.startswith("dmm: error:")]
    assert re.fullmatch(r"dmm: error: Ray assigned GPU\(s\) \[[01]\] but torch \S+ here has no CUDA; fix: install a "
                        r"CUDA build of torch on the GPU nodes, or set DMM_FORCE_DEVICE=cpu", ours), refused.stderr
    assert AttributionStore.open(tmp_path / "s").completed_models() == 0
