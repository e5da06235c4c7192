"""Amnesiac unlearning (matching/baselines/amnesiac.py) and the update records it reads
(attribution/update_record.py): the record leaves training bit-identical, amnesiac equals the recorded
trajectory without the updates of the batches that held F, the partial record keeps exactly the top
fraction per tensor, and a model without a record is a one-line error."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from attribution.checkpoint import load_model, model_meta, save_model
from attribution.datasets import load_dataset
from attribution.engine import train_model
from attribution.recipes import RECIPES
from attribution.store import AttributionStore, StoreSpec
from attribution.update_record import UpdateRecord, UpdateRecorder, UpdateRecordError, record_dir
from cluster.cli import main
from matching.errors import MatchingError
from matching.ledger import read_ledger
from matching.methods import METHOD_CONFIGS, METHODS, UnlearnTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = RECIPES["digits-mlp"].with_epochs(2)  # 2 × 23 steps of 64
FORGET = np.array([5, 500, 1000])               # a few ids: some batches hold one, most do not


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits")


class Trajectory:
    """A recorder that keeps every θ_t (full copies) and batch t's ids, and passes both on to `inner`."""

    def __init__(self, inner=None):
        self.inner = inner

    def start(self, model):
        self.states, self.ids = [self._params(model)], []
        if self.inner:
            self.inner.start(model)

    def step(self, ids, model):
        self.states.append(self._params(model))
        self.ids.append(ids.clone())
        if self.inner:
            self.inner.step(ids, model)

    @staticmethod
    def _params(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def without(self, forget, keep: float = 1.0) -> dict[str, torch.Tensor]:
        """θ_T − Σ_{t∈B_F} Δθ_t from the states, each Δ kept to its top ⌈keep·numel⌉ entries by |Δ| (float64)."""
        out = {n: p.double() for n, p in self.states[-1].items()}
        for t, ids in enumerate(self.ids):
            if np.isin(ids.numpy(), forget).any():
                for n in out:
                    delta = (self.states[t + 1][n] - self.states[t][n]).flatten()
                    kept = torch.zeros_like(delta)
                    index = delta.abs().topk(math.ceil(keep * delta.numel())).indices
                    kept[index] = delta[index]
                    out[n] -= kept.double().view(out[n].shape)
        return out


def recorded(data, path, keep: float = 1.0, seed: int = 0, **shards):
    """Train with a record beside `path` (and the trajectory), save the model; (model, trajectory, recorder)."""
    recorder = UpdateRecorder(path, keep, **shards)
    trajectory = Trajectory(recorder)
    model = train_model("mlp", data, RECIPE, seed, recorder=trajectory)
    save_model(path, model.state_dict(), model_meta(data, "mlp", RECIPE, seed, update_record=recorder.finish()))
    return model, trajectory, recorder


def run_amnesiac(data, model, path, forget=FORGET, **params):
    config = METHOD_CONFIGS["amnesiac"](**params)
    return METHODS["amnesiac"](UnlearnTask(model=model, data=data, forget_ids=forget, store=None, original_logits=None,
                                           config=config, model_path=str(path) if path else None))


def test_recording_leaves_the_training_bit_identical(data, tmp_path):
    plain = train_model("mlp", data, RECIPE, 3)
    for keep in (1.0, 0.2):
        model = train_model("mlp", data, RECIPE, 3, recorder=UpdateRecorder(tmp_path / f"m{keep}", keep))
        for k, v in plain.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), (keep, k)


def test_amnesiac_equals_the_trajectory_without_the_forget_batches(data, tmp_path):
    path = tmp_path / "m.safetensors"
    model, trajectory, _ = recorded(data, path, shard_bytes=1 << 20)  # 14 steps of 77 kB per shard
    assert len(UpdateRecord.of_model(path).manifest["shards"]) == 4
    held = [t for t, ids in enumerate(trajectory.ids) if np.isin(ids.numpy(), FORGET).any()]
    assert 0 < len(held) < len(trajectory.ids) == 46
    out = run_amnesiac(data, model, path, epochs=0)
    assert out.stats["batches_removed"] == len(held) and out.stats["record_steps"] == 46
    expected = trajectory.without(FORGET)
    moved = 0.0
    for n, p in out.model.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[n], rtol=0, atol=1e-6)
        moved = max(moved, (p.detach() - model.state_dict()[n]).abs().max().item())
    assert moved > 1e-3  # the subtraction did move θ
    for n, p in model.named_parameters():  # and left the input model as trained
        assert torch.equal(p.detach(), trajectory.states[-1][n])


def test_the_repair_trains_one_epoch_on_the_retain_set_from_the_subtraction(data, tmp_path):
    path = tmp_path / "m.safetensors"
    model, _, _ = recorded(data, path)
    bare = run_amnesiac(data, model, path, epochs=0).model
    repaired = run_amnesiac(data, model, path)  # default: one repair epoch
    n_retain = data.n_train - len(FORGET)
    assert METHOD_CONFIGS["amnesiac"]().epochs == 1
    assert repaired.stats["steps"] == -(-n_retain // 64) and repaired.stats["sample_grads"] == n_retain
    assert any(not torch.equal(a, b) for a, b in zip(bare.state_dict().values(), repaired.model.state_dict().values()))


def test_the_partial_record_keeps_exactly_the_top_fraction_per_tensor_and_reports_its_bytes(data, tmp_path):
    keep = 0.25
    model, trajectory, recorder = recorded(data, tmp_path / "p.safetensors", keep)
    folder = record_dir(tmp_path / "p.safetensors")
    entry = json.loads((tmp_path / "p.safetensors.json").read_text())["update_record"]
    assert entry == {"path": "p.safetensors.updates", "format": 1, "keep": keep, "steps": 46,
                     "bytes": sum(f.stat().st_size for f in folder.iterdir())}
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = [load_file(str(folder / s["file"])) for s in manifest["shards"]]
    t = 0
    for shard in shards:
        for row, ids in enumerate(shard["ids"].split(shard["sizes"].tolist())):
            assert torch.equal(ids, trajectory.ids[t])
            for n, p in model.named_parameters():
                delta = (trajectory.states[t + 1][n] - trajectory.states[t][n]).flatten()
                index, value = shard[f"{n}.index"][row].long(), shard[f"{n}.value"][row]
                assert len(index) == len(set(index.tolist())) == math.ceil(keep * p.numel())  # bias (10,): 3
                assert torch.equal(value, delta[index])
                dropped = torch.ones_like(delta, dtype=torch.bool)
                dropped[index] = False
                assert not dropped.any() or value.abs().min() >= delta[dropped].abs().max()
            t += 1
    assert t == 46
    full_path = tmp_path / "f.safetensors"
    recorded(data, full_path)
    full = json.loads((tmp_path / "f.safetensors.json").read_text())["update_record"]["bytes"]
    assert entry["bytes"] < 0.6 * full  # k values + k int32 indices per tensor: ≈ 2·keep of the dense record
    assert f"{entry['bytes']:,} bytes" in recorder.summary()
    out = run_amnesiac(data, model, tmp_path / "p.safetensors", epochs=0)
    expected = trajectory.without(FORGET, keep)
    for n, p in out.model.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[n], rtol=0, atol=1e-6)


def test_no_record_or_another_model_is_a_one_line_error(data, tmp_path):
    plain = tmp_path / "plain.safetensors"
    model = train_model("mlp", data, RECIPE, 0)
    save_model(plain, model.state_dict(), model_meta(data, "mlp", RECIPE, 0))
    with pytest.raises(UpdateRecordError, match=r"has no update record; train it with `dmm train --record-updates`"):
        run_amnesiac(data, model, plain)
    with pytest.raises(MatchingError, match="pass --model, a file written by `dmm train --record-updates`"):
        run_amnesiac(data, model, None)
    path = tmp_path / "m.safetensors"
    recorded(data, path)
    other = train_model("mlp", data, RECIPE, 1)
    with pytest.raises(UpdateRecordError, match="is not the model its update record"):
        run_amnesiac(data, other, path)


def test_bad_keep_and_missing_record_from_the_command_line(tmp_path, capsys):
    ids = tmp_path / "f.txt"
    ids.write_text("5 500 1000")
    for keep in ("0", "1.5"):
        assert main(["train", "--dataset", "digits", "--seed", "0", "--out", str(tmp_path / "k.safetensors"),
                     "--record-keep", keep]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--record-keep {float(keep)} must lie in (0, 1]" in err
    assert list(tmp_path.iterdir()) == [ids]
    plain = tmp_path / "plain.safetensors"
    assert main(["train", "--dataset", "digits", "--seed", "0", "--epochs", "1", "--out", str(plain)]) == 0
    capsys.readouterr()
    out = tmp_path / "u.safetensors"
    assert main(["unlearn", "--method", "amnesiac", "--dataset", "digits", "--model", str(plain), "--forget", str(ids),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dmm train --record-updates" in err
    assert not out.exists() and not out.with_name(out.name + ".json").exists()


def test_train_with_a_record_then_unlearn_from_the_command_line(data, tmp_path, capsys):
    model_path, ids, out = tmp_path / "m.safetensors", tmp_path / "f.txt", tmp_path / "u.safetensors"
    ids.write_text(" ".join(map(str, FORGET)))
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--seed", "0", "--epochs", "2", "--out",
                 str(model_path), "--record-keep", "0.5"]) == 0
    printed = capsys.readouterr().out
    entry = json.loads((tmp_path / "m.safetensors.json").read_text())["update_record"]
    assert f"update record: 46 steps, keep 0.5, {entry['bytes']:,} bytes" in printed
    assert main(["unlearn", "--method", "amnesiac", "--dataset", "digits", "--model", str(model_path), "--forget",
                 str(ids), "--out", str(out), "--set", "epochs=0"]) == 0
    assert "amnesiac forgot 3 ids of digits" in capsys.readouterr().out
    unlearned, meta = load_model(out, data)
    assert meta["unlearned"]["method"] == "amnesiac" and meta["unlearned"]["config"]["epochs"] == 0
    assert "update_record" not in meta  # the record describes the input's training
    trajectory = Trajectory()  # the same training again (same seed and recipe): its trajectory, unrecorded
    train_model("mlp", data, RECIPE, 0, recorder=trajectory)
    expected = trajectory.without(FORGET, keep=0.5)
    for n, p in unlearned.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[n], rtol=0, atol=1e-6)
    assert main(["methods"]) == 0
    assert "amnesiac (training records): Amnesiac" in capsys.readouterr().out


def test_a_record_is_replaced_not_merged(data, tmp_path):
    path = tmp_path / "m.safetensors"
    recorded(data, path, keep=0.5)
    recorded(data, path, seed=1)
    model, _ = load_model(path, data)
    record = UpdateRecord.of_model(path)
    record.check_model(model, path)
    assert record.manifest["keep"] == 1.0 and sorted(f.name for f in record.directory.iterdir()) == \
        ["manifest.json", "shard-00000.safetensors"]
    assert not record.directory.with_name(record.directory.name + ".tmp").exists()


def test_a_store_request_records_amnesiac_and_a_second_request_needs_the_recorded_model(data, tmp_path, capsys):
    path, ids, out = tmp_path / "m.safetensors", tmp_path / "f.txt", tmp_path / "u.safetensors"
    recorded(data, path)
    ids.write_text(" ".join(map(str, FORGET)))
    spec = StoreSpec(dataset=data.name, fingerprint=data.fingerprint, model="mlp", recipe=RECIPE.to_dict(), alpha=0.5,
                     seed=0, block_size=100, n_train=data.n_train, n_points=data.n_points, num_classes=10)
    store = AttributionStore.open_or_create(str(tmp_path / "store.zarr"), spec, 100).url
    args = ["unlearn", "--store", store, "--method", "amnesiac", "--forget", str(ids)]
    assert main([*args, "--model", str(path), "--out", str(out)]) == 0
    assert "request 1: amnesiac forgot 3 new ids" in capsys.readouterr().out
    (entry,) = read_ledger(AttributionStore.open(store))
    assert entry.method == "amnesiac" and entry.stats["batches_removed"] > 0 and entry.config["epochs"] == 1
    ids.write_text("7 8 9")
    again = tmp_path / "u2.safetensors"
    assert main([*args, "--model", str(out), "--out", str(again)]) == 2
    assert "has no update record" in capsys.readouterr().err  # the output's sidecar does not claim the input's
    assert not again.exists() and len(read_ledger(AttributionStore.open(store))) == 1
