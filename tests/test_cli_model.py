"""`dmm train` and `dmm predict` (cluster/commands_model.py through cluster/cli.py main)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from attribution.checkpoint import load_model
from attribution.datasets import load_dataset
from attribution.recipes import default_recipe
from cluster.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One digits model, seed 0, with the stdout of its `dmm train`."""
    out = tmp_path_factory.mktemp("train") / "m.safetensors"
    capture = {}
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        capture["rc"] = main(["train", "--dataset", "digits", "--model", "mlp", "--seed", "0", "--out", str(out)])
    capture["stdout"] = buf.getvalue()
    return out, capture


def sidecar(path):
    return json.loads((path.parent / (path.name + ".json")).read_text())


def run_error(capsys, argv, *needles):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmm: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---------------------------------------------------------------- train

def test_train_writes_model_and_sidecar(trained, digits):
    out, capture = trained
    assert capture["rc"] == 0
    state = load_file(str(out))
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    meta = sidecar(out)
    assert meta["dataset"] == "digits"
    assert meta["fingerprint"] == digits.fingerprint
    assert meta["model"] == "mlp"
    assert meta["recipe"] == default_recipe("digits").to_dict()
    assert meta["seed"] == 0
    assert meta["excluded"] == []
    assert meta["num_classes"] == 10
    assert not list(out.parent.glob("*.tmp"))


def test_train_prints_held_out_accuracy(trained, digits):
    out, capture = trained
    m = re.search(r"held-out accuracy (\d\.\d+)", capture["stdout"])
    assert m, capture["stdout"]
    acc = float(m.group(1))
    assert acc >= 0.9
    model, _ = load_model(out, digits)
    with torch.no_grad():
        real = (model(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
    assert acc == pytest.approx(real, abs=1e-4)


def test_train_is_deterministic(trained, tmp_path, capsys):
    out, _ = trained
    again = tmp_path / "again.safetensors"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--seed", "0", "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()
    other = tmp_path / "seed1.safetensors"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--seed", "1", "--out", str(other)]) == 0
    assert other.read_bytes() != out.read_bytes()
    assert sidecar(other)["seed"] == 1


def test_train_exclude(trained, tmp_path):
    out, _ = trained
    ids = tmp_path / "forget.txt"
    ids.write_text("30\n5\n1436\n")
    excl = tmp_path / "excl.safetensors"
    assert main(["train", "--dataset", "digits", "--seed", "0", "--out", str(excl), "--exclude", str(ids)]) == 0
    meta = sidecar(excl)
    assert meta["excluded"] == [5, 30, 1436]
    assert meta["model"] == "mlp"  # the dataset's default model
    assert meta["seed"] == 0
    assert excl.read_bytes() != out.read_bytes()
    a, b = load_file(str(out)), load_file(str(excl))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_train_pt_loads_weights_only(trained, tmp_path):
    out, _ = trained
    pt = tmp_path / "m.pt"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--seed", "0", "--out", str(pt)]) == 0
    state = torch.load(pt, weights_only=True)
    reference = load_file(str(out))
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    assert sidecar(pt)["fingerprint"] == sidecar(out)["fingerprint"]


# ---------------------------------------------------------------- predict

def test_predict_logits(trained, digits, tmp_path, capsys):
    out, _ = trained
    npy = tmp_path / "logits.npy"
    assert main(["predict", "--model", str(out), "--out", str(npy)]) == 0
    logits = np.load(npy)
    assert logits.dtype == np.float32 and logits.shape == (1797, 10)
    model, _ = load_model(out, digits)
    with torch.no_grad():
        train_logits = model(digits.x_train).numpy()
        test_logits = model(digits.x_test).numpy()
    np.testing.assert_allclose(logits[:1437], train_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[1437:], test_logits, rtol=1e-5, atol=1e-5)
    # not symmetric in train/test: the train block is not the held-out block
    assert not np.allclose(logits[:360], test_logits)
    assert "(1797, 10)" in capsys.readouterr().out


def test_predict_pt_model(trained, tmp_path):
    out, _ = trained
    pt = tmp_path / "m.pt"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--seed", "0", "--out", str(pt)]) == 0
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert main(["predict", "--model", str(pt), "--out", str(a)]) == 0
    assert main(["predict", "--model", str(out), "--out", str(b)]) == 0
    np.testing.assert_array_equal(np.load(a), np.load(b))


# ---------------------------------------------------------------- errors: exit 2, one stderr line, no output

def test_train_unknown_dataset(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    run_error(capsys, ["train", "--dataset", "nosuch", "--out", str(out)], "nosuch")
    assert list(tmp_path.iterdir()) == []


def test_train_unknown_model(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    run_error(capsys, ["train", "--dataset", "digits", "--model", "transformer", "--out", str(out)], "transformer")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, needle", [("3 1500", "held-out"), ("3 abc", "abc"), ("4 4", "listed"),
                                             ("", "no ids"), ("-2", "negative")])
def test_train_bad_ids_file(tmp_path, capsys, content, needle):
    ids = tmp_path / "ids.txt"
    ids.write_text(content)
    out = tmp_path / "m.safetensors"
    run_error(capsys, ["train", "--dataset", "digits", "--out", str(out), "--exclude", str(ids)], needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt"]


def test_train_missing_ids_file(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    run_error(capsys, ["train", "--out", str(out), "--exclude", str(tmp_path / "none.txt")], "none.txt")
    assert list(tmp_path.iterdir()) == []


def test_predict_garbage_model_file(tmp_path, capsys, trained):
    out, _ = trained
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage bytes, not a safetensors file" * 4)
    shutil.copy(out.parent / (out.name + ".json"), tmp_path / "bad.safetensors.json")
    npy = tmp_path / "logits.npy"
    run_error(capsys, ["predict", "--model", str(bad), "--out", str(npy)], "bad.safetensors")
    assert not npy.exists()

    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"garbage bytes, not a torch file")
    run_error(capsys, ["predict", "--model", str(bad_pt), "--out", str(npy)], "bad.pt")
    assert not npy.exists()


def test_predict_missing_sidecar(tmp_path, capsys, trained):
    out, _ = trained
    lone = tmp_path / "lone.safetensors"
    shutil.copy(out, lone)
    npy = tmp_path / "logits.npy"
    run_error(capsys, ["predict", "--model", str(lone), "--out", str(npy)], "lone.safetensors.json")
    assert not npy.exists()


def test_predict_sidecar_without_names(tmp_path, capsys, trained):
    out, _ = trained
    m = tmp_path / "m.safetensors"
    shutil.copy(out, m)
    (tmp_path / "m.safetensors.json").write_text(json.dumps({"seed": 0}))
    npy = tmp_path / "logits.npy"
    run_error(capsys, ["predict", "--model", str(m), "--out", str(npy)], "m.safetensors.json")
    assert not npy.exists()


def test_predict_missing_model_file(tmp_path, capsys):
    npy = tmp_path / "logits.npy"
    run_error(capsys, ["predict", "--model", str(tmp_path / "none.safetensors"), "--out", str(npy)], "none.safetensors")
    assert not npy.exists()


def test_predict_refuses_changed_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.normal(size=(40, 4)), y_train=rng.integers(0, 2, 40),
                  x_test=rng.normal(size=(10, 4)), y_test=rng.integers(0, 2, 10))
    data = tmp_path / "d.npz"
    np.savez(data, **arrays)
    model = tmp_path / "m.safetensors"
    assert main(["train", "--dataset", f"npz:{data}", "--model", "mlp", "--recipe", "digits-mlp",
                 "--out", str(model)]) == 0
    npy = tmp_path / "logits.npy"
    assert main(["predict", "--model", str(model), "--out", str(npy)]) == 0
    assert np.load(npy).shape == (50, 2)
    npy.unlink()
    arrays["x_train"][0, 0] += 1.0  # same name, other content
    np.savez(data, **arrays)
    capsys.readouterr()
    run_error(capsys, ["predict", "--model", str(model), "--out", str(npy)], "other data")
    assert not npy.exists()


# ---------------------------------------------------------------- --device

def test_device_cpu_is_the_default(trained, tmp_path):
    out, _ = trained
    cpu = tmp_path / "cpu.safetensors"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--seed", "0", "--device", "cpu",
                 "--out", str(cpu)]) == 0
    assert cpu.read_bytes() == out.read_bytes()
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert main(["predict", "--model", str(out), "--device", "cpu", "--out", str(a)]) == 0
    assert main(["predict", "--model", str(out), "--out", str(b)]) == 0
    np.testing.assert_array_equal(np.load(a), np.load(b))


BAD_DEVICES = [("gpu", "unknown device")] + ([] if torch.cuda.is_available() else [("cuda", "no CUDA GPU")]) + \
    [("mps", "not supported")]


@pytest.mark.parametrize("device, needle", BAD_DEVICES)
def test_a_bad_device_is_refused_before_anything_is_written(trained, tmp_path, capsys, device, needle):
    out, _ = trained
    model = tmp_path / "m.safetensors"
    run_error(capsys, ["train", "--device", device, "--out", str(model)], needle, device)
    npy = tmp_path / "logits.npy"
    run_error(capsys, ["predict", "--model", str(out), "--device", device, "--out", str(npy)], needle)
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2\n")
    run_error(capsys, ["unlearn", "--store", str(tmp_path / "store"), "--model", str(out), "--forget", str(ids),
                       "--device", device, "--out", str(tmp_path / "u.safetensors")], needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_train_and_predict_agree_with_cpu(trained, digits, tmp_path):
    out, _ = trained
    gpu_logits, cpu_logits = tmp_path / "g.npy", tmp_path / "c.npy"
    assert main(["predict", "--model", str(out), "--device", "cuda", "--out", str(gpu_logits)]) == 0
    assert main(["predict", "--model", str(out), "--out", str(cpu_logits)]) == 0
    np.testing.assert_allclose(np.load(gpu_logits), np.load(cpu_logits), rtol=1e-4, atol=1e-4)
    gpu_model = tmp_path / "g.safetensors"
    assert main(["train", "--dataset", "digits", "--device", "cuda", "--out", str(gpu_model)]) == 0
    model, _ = load_model(gpu_model, digits)
    with torch.no_grad():
        assert (model(digits.x_test).argmax(1) == digits.y_test).float().mean().item() >= 0.9
