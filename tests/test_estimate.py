"""`dmm estimate` / `dmm status` / `dmm submit` arguments: blocks, resume, growth, refusal, status."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attribution.datasets import load_dataset
from attribution.errors import DmmError
from attribution.store import AttributionStore
from cluster.cli import main
from cluster.estimate import EstimateRequest, run_estimate, train_block
from fixtures_store import tree_hashes

TINY = dict(epochs=2, block_size=4)  # the digits recipe cut to 2 epochs: blocks train in ~0.1 s


def test_estimate_writes_the_deterministic_blocks(ray_session, tmp_path):
    request = EstimateRequest.build("digits", **TINY)
    result = run_estimate(request, tmp_path / "s", 8, progress=False)
    assert (result.trained, result.skipped) == (2, 0)
    masks, logits, blocks = result.store.read()
    n = load_dataset("digits").n_train
    assert blocks == [0, 1]
    assert np.array_equal(masks, np.concatenate([request.block_subsets(b, n)[0] for b in blocks]))
    assert (masks.sum(1) == round(0.5 * n)).all()
    assert logits.shape == (8, 1797, 10) and np.isfinite(logits).all()
    assert result.store.attrs["recipe"]["epochs"] == 2  # the override is part of the store's identity


def test_rerun_skips_done_blocks_and_num_models_grows(ray_session, tmp_path):
    request = EstimateRequest.build("digits", **TINY)
    run_estimate(request, tmp_path / "s", 8, progress=False)
    before = tree_hashes(tmp_path / "s")
    again = run_estimate(request, tmp_path / "s", 8, progress=False)
    assert (again.trained, again.skipped) == (0, 2)
    assert tree_hashes(tmp_path / "s") == before
    grown = run_estimate(request, tmp_path / "s", 10, progress=False)
    assert (grown.trained, grown.skipped) == (1, 2)
    assert grown.store.completed_models() == grown.store.allocated_models == 12


@pytest.mark.parametrize("threads", [1, 2])
def test_a_rewritten_block_has_the_same_bytes(tmp_path, threads):
    """A retry runs with its task's thread count: the same bytes; with another count, the same values
    up to float rounding (conftest restores the thread count train_block sets)."""
    request = EstimateRequest.build("digits", **TINY)
    store = AttributionStore.open_or_create(tmp_path / "s", request.spec(load_dataset("digits")), 4)
    train_block(store, request, 0, threads=threads)
    first, logits = tree_hashes(tmp_path / "s"), store.read()[1]
    train_block(store, request, 0, threads=threads)  # what a retry does
    assert tree_hashes(tmp_path / "s") == first
    train_block(store, request, 0, threads=3 - threads)  # the same block with the other count
    np.testing.assert_allclose(store.read()[1], logits, rtol=1e-5, atol=1e-5)


def _npz(path: Path, shift: float = 0.0) -> str:
    d = load_dataset("digits")
    np.savez(path, x_train=d.x_train.numpy() + shift, y_train=d.y_train.numpy(),
             x_test=d.x_test.numpy(), y_test=d.y_test.numpy())
    return f"npz:{path}"


@pytest.mark.parametrize("change", [["--seed", "1"], ["--alpha", "0.4"], ["--model", "cnn1d"],
                                    ["--epochs", "3"], ["--block-size", "8"], "other-dataset", "fingerprint"])
def test_a_store_built_for_another_request_is_refused_unchanged(tmp_path, capsys, change):
    data = _npz(tmp_path / "d.npz")
    base = ["estimate", "--dataset", data, "--model", "mlp", "--recipe", "digits-mlp", "--num-models", "4",
            "--store", tmp_path / "s", "--epochs", "2", "--block-size", "4"]
    spec = EstimateRequest.build(data, "mlp", "digits-mlp", **TINY).spec(load_dataset(data))
    AttributionStore.open_or_create(tmp_path / "s", spec, 4)
    before = tree_hashes(tmp_path / "s")
    if change == "other-dataset":
        args = [a if a != data else "digits" for a in base]
    elif change == "fingerprint":
        _npz(tmp_path / "d.npz", shift=1.0)  # same name, other content
        args = base
    else:
        args = base + change
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dmm: error: store ") and "different request" in err and err.count("\n") == 1
    assert tree_hashes(tmp_path / "s") == before


def test_status_prints_progress_and_attributes(ray_session, tmp_path, capsys):
    run_estimate(EstimateRequest.build("digits", **TINY), tmp_path / "s", 6, progress=False)
    assert main(["status", "--store", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("models: 8/8 completed (2/2 blocks of 4; 6 requested)")
    for line in ("dataset: digits", "model: mlp", "alpha: 0.5", "seed: 0", "block_size: 4"):
        assert line in out.splitlines()
    assert '"epochs": 2' in out


def test_status_of_a_missing_store_is_one_line(tmp_path, capsys):
    assert main(["status", "--store", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("argv", [["submit"], ["submit", "--logs", "j", "--", "status", "--store", "x"]])
def test_submit_needs_either_a_command_or_logs(argv, capsys):
    assert main(argv) == 2
    assert "give either a command" in capsys.readouterr().err


def test_bad_task_resources_are_refused(tmp_path):
    with pytest.raises(DmmError, match="cpus-per-task"):
        run_estimate(EstimateRequest.build("digits", **TINY), tmp_path / "s", 4, cpus_per_task=0)
    assert not (tmp_path / "s").exists()
