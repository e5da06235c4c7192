"""Issue 17: a model file or a store never makes the pipeline import code, touch the network or write a
dataset file that the user did not ask for.

A `module:callable` model named by a sidecar or a store is imported only with consent (--trust-code,
`trust_code=True`, or the name typed as --model); a dataset named by a file is never downloaded, and an
`npz:` path named by a file is only read.
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from attribution import datasets
from attribution.checkpoint import CheckpointError, load_model, model_meta, save_model
from attribution.datasets import DatasetError, load_dataset
from attribution.deletion_scale import calibrate
from attribution.models import ModelError, mlp
from attribution.recipes import RECIPES
from attribution.store import AttributionStore, StoreSpec
from attribution.trak import run_trak
from cluster.cli import main
from fixtures_store import copy_store, digits_store, tree_hashes
from matching.direct import dm_direct_prediction
from matching.errors import MatchingError
from matching.inputs import load_store_model, store_dataset
from matching.request import unlearn_request

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
RECIPE = RECIPES["digits-mlp"]

PROBE = '''"""A model factory that records its own import."""
from pathlib import Path

Path({log!r}).open("a").write("imported\\n")


def factory(input_shape, num_classes):
    from attribution.models import mlp
    return mlp(input_shape, num_classes)
'''


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A fresh module `dmm_probe_<hex>` on sys.path that appends a line to `log` when it is imported."""
    name = f"dmm_probe_{secrets.token_hex(4)}"
    code = tmp_path / "code"
    code.mkdir()
    log = tmp_path / "imported.log"
    (code / f"{name}.py").write_text(PROBE.format(log=str(log)))
    monkeypatch.syspath_prepend(str(code))
    yield SimpleNamespace(module=name, factory=f"{name}:factory", log=log, code=code)
    sys.modules.pop(name, None)


def save_mlp(path: Path, data, **meta) -> Path:
    """An mlp's weights with a sidecar whose fields `meta` overrides (the weights fit the probe's factory)."""
    state = mlp(data.input_shape, data.num_classes).state_dict()
    save_model(path, state, {**model_meta(data, "mlp", RECIPE, 0), **meta})
    return path


def assert_refused(err: BaseException | str, probe) -> None:
    """One line naming the module and the flag, and the module was not imported."""
    msg = str(err)
    assert "\n" not in msg and repr(probe.module) in msg and "--trust-code" in msg, msg
    assert not probe.log.exists() and probe.module not in sys.modules


def make_store(path: Path, data, **changes) -> AttributionStore:
    fields = dict(dataset=data.name, fingerprint=data.fingerprint, model="mlp", recipe=RECIPE.to_dict(), alpha=0.5,
                  seed=0, block_size=4, n_train=data.n_train, n_points=data.n_points, num_classes=data.num_classes)
    return AttributionStore.open_or_create(str(path), StoreSpec(**{**fields, **changes}), 4)


# ---------------------------------------------------------------- code named by a file

def test_a_sidecar_naming_code_imports_it_only_with_consent(probe, digits, tmp_path):
    path = save_mlp(tmp_path / "m.safetensors", digits, model=probe.factory)
    with pytest.raises(ModelError) as e:
        load_model(path)
    assert_refused(e.value, probe)
    model, meta = load_model(path, trust_code=True)
    assert probe.log.read_text() == "imported\n" and meta["model"] == probe.factory
    reference = mlp(digits.input_shape, digits.num_classes)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(digits.x_test), reference(digits.x_test))


def test_registry_names_load_without_consent(digits, tmp_path):
    path = save_mlp(tmp_path / "m.safetensors", digits)
    model, meta = load_model(path)
    assert meta["model"] == "mlp" and isinstance(model, torch.nn.Module)


def test_the_command_line_needs_trust_code(probe, digits, tmp_path, run_dmm):
    path = save_mlp(tmp_path / "m.safetensors", digits, model=probe.factory)
    npy = tmp_path / "logits.npy"
    env = {**os.environ, "PYTHONPATH": f"{probe.code}{os.pathsep}{ROOT}"}
    refused = run_dmm(["predict", "--model", path, "--out", npy], env=env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("dmm: error: model sidecar ")
    assert_refused(refused.stderr.strip(), probe)
    assert not npy.exists()
    # consent, in this process (the probe is on sys.path here too): it is imported and used
    assert main(["predict", "--model", str(path), "--out", str(npy), "--trust-code"]) == 0
    assert probe.log.read_text() == "imported\n" and np.load(npy).shape == (digits.n_points, 10)


def test_a_model_name_typed_on_the_command_line_is_consent(probe, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["train", "--model", probe.factory, "--recipe", "digits-mlp", "--epochs", "1", "--out", str(out)]) == 0
    assert probe.log.read_text() == "imported\n"
    npy = tmp_path / "logits.npy"
    assert main(["predict", "--model", str(out), "--out", str(npy)]) == 2  # the file alone is not consent
    assert probe.module in capsys.readouterr().err and not npy.exists()


def test_a_store_naming_code_imports_it_only_with_consent(probe, digits, tmp_path):
    store = make_store(tmp_path / "s.zarr", digits, model=probe.factory)
    model = save_mlp(tmp_path / "m.safetensors", digits, model=probe.factory)
    before = tree_hashes(tmp_path / "s.zarr", model)
    out = tmp_path / "u.safetensors"
    for attempt in (lambda: run_trak(store),
                    lambda: unlearn_request(store.url, model, [0, 1], out=out),
                    lambda: dm_direct_prediction(store.url, [0, 1], model)):
        with pytest.raises(ModelError) as e:
            attempt()
        assert_refused(e.value, probe)
    assert tree_hashes(tmp_path / "s.zarr", model) == before and not out.exists()
    with pytest.raises(MatchingError, match="no fitted datamodels"):  # consent given: it gets as far as β
        dm_direct_prediction(store.url, [0, 1], model, trust_code=True)
    assert probe.log.read_text() == "imported\n"
    loaded, _ = load_store_model(model, store, digits, trust_code=True)
    assert isinstance(loaded, torch.nn.Module)


class RunsCode:
    """Unpickling this object calls os.mkdir(marker): what a hostile .pt file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_pt_file_whose_pickle_runs_code_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    marker = tmp_path / "ran"
    torch.save({"0.weight": torch.zeros(2), "hook": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert "\n" not in str(e.value) and "m.pt" in str(e.value)
    assert not marker.exists()


# ---------------------------------------------------------------- data named by a file

@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """An empty CIFAR-10 cache, no CIFAR-10 loaded in this process, and a downloader that fails the test."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("DMM_DATA", str(cache))
    monkeypatch.setattr(datasets, "_LOADED", {})

    def download(*args, **kwargs):
        pytest.fail(f"network access attempted: urlretrieve{args}")
    monkeypatch.setattr(datasets.urllib.request, "urlretrieve", download)
    return cache


def test_a_sidecar_naming_cifar10_does_not_download(no_network, digits, tmp_path, capsys):
    path = save_mlp(tmp_path / "m.safetensors", digits, dataset="cifar10", model="resnet9")
    with pytest.raises(DatasetError) as e:
        load_model(path)
    assert "\n" not in str(e.value) and "--dataset cifar10" in str(e.value)
    npy = tmp_path / "logits.npy"
    assert main(["predict", "--model", str(path), "--out", str(npy)]) == 2
    assert "no archive" in capsys.readouterr().err
    assert not npy.exists() and list(no_network.iterdir()) == []


def test_a_store_naming_cifar10_does_not_download(no_network, digits, tmp_path):
    store = make_store(tmp_path / "s.zarr", digits, dataset="cifar10", model="resnet9")
    with pytest.raises(DatasetError, match="no archive"):
        store_dataset(store)
    with pytest.raises(DatasetError, match="no archive"):
        run_trak(store)
    assert list(no_network.iterdir()) == []


def test_an_npz_named_by_a_sidecar_is_only_read(digits, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    npz = folder / "d.npz"
    np.savez(npz, x_train=digits.x_train.numpy(), y_train=digits.y_train.numpy(), x_test=digits.x_test.numpy(),
             y_test=digits.y_test.numpy())
    data = load_dataset(f"npz:{npz}")
    path = save_mlp(tmp_path / "m.safetensors", data)
    before = tree_hashes(folder)
    load_model(path)
    assert tree_hashes(folder) == before
    gone = save_mlp(tmp_path / "gone.safetensors", data, dataset=f"npz:{tmp_path / 'nowhere' / 'd.npz'}")
    with pytest.raises(DatasetError, match="is not a file"):
        load_model(gone)
    assert not (tmp_path / "nowhere").exists()


def test_calibrating_a_store_naming_code_imports_it_only_with_consent(probe, tmp_path, tmp_path_factory, run_dmm):
    """`dmm calibrate` trains models of the store's architecture: a fitted store naming a module:callable is
    refused (API and command line: one line, exit 2, the store unchanged) until --trust-code."""
    url = copy_store(digits_store(tmp_path_factory.getbasetemp() / "digits-store"), tmp_path / "s.zarr")
    zarr.open_group(url, mode="r+").attrs["model"] = probe.factory
    before = tree_hashes(url)
    fit = AttributionStore.open(url).fit_group("datamodels")
    with pytest.raises(ModelError) as e:
        calibrate(fit, store_dataset(fit.store), models=2)
    assert_refused(e.value, probe)
    env = {**os.environ, "PYTHONPATH": f"{probe.code}{os.pathsep}{ROOT}"}
    refused = run_dmm(["calibrate", "--store", url, "--models", "2"], env=env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert_refused(refused.stderr.strip(), probe)
    assert tree_hashes(url) == before
    assert main(["calibrate", "--store", url, "--models", "2", "--trust-code"]) == 0  # consent: imported and used
    assert probe.log.read_text() == "imported\n"
    assert AttributionStore.open(url).fit_group("datamodels").attrs["deletion_scale"]["models"] == 2
