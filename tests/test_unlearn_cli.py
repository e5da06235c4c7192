"""`dmm unlearn` and `dmm ledger` (cluster/commands_unlearn.py): output, bad input, concurrency."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from attribution.checkpoint import file_sha256, model_meta, save_model
from attribution.models import mlp
from attribution.store import AttributionStore
from cluster.cli import main
from fixtures_store import MODEL, copy_store, digits_store, train_and_save, tree_hashes
from matching.finetune import MatchingConfig
from matching.ledger import read_ledger, store_lock
from matching.request import unlearn_request

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent


def write_ids(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store copy with one request made (θ0 → u1), plus stores and model files that must be refused."""
    fixture = digits_store(tmp_path_factory.getbasetemp() / "digits-store")
    base = tmp_path_factory.mktemp("cli")
    data = fixture.data
    (theta0,) = train_and_save(fixture, [base / "theta0.safetensors"], [0])
    store = copy_store(fixture, base / "store.zarr")
    unlearn_request(store, theta0, [0, 1, 2], out=base / "u1.safetensors")

    unfitted = AttributionStore.open_or_create(str(base / "unfitted.zarr"), fixture.spec(), 100).url
    alien = AttributionStore.open_or_create(str(base / "alien.zarr"), fixture.spec(fingerprint="f" * 64), 100).url
    meta = model_meta(data, MODEL, fixture.recipe, 0)
    bad = base / "bad"
    bad.mkdir()
    save_model(bad / "narrow.safetensors", mlp(data.input_shape, 10, hidden=(16,)).state_dict(), meta)
    save_model(bad / "k11.safetensors", mlp(data.input_shape, 11).state_dict(), {**meta, "num_classes": 11})
    save_model(bad / "cnn.safetensors", mlp(data.input_shape, 10).state_dict(), {**meta, "model": "cnn1d"})
    (bad / "garbage.safetensors").write_bytes(b"not a model at all")
    (bad / "garbage.safetensors.json").write_text("{}")
    return dict(fixture=fixture, base=base, theta0=theta0, store=store, u1=base / "u1.safetensors",
                unfitted=unfitted, alien=alien, bad=bad, n_train=data.n_train)


def test_unlearn_and_ledger_print_what_they_did(world, tmp_path, capsys):
    store = copy_store(world["fixture"], tmp_path / "store.zarr")
    ids = write_ids(tmp_path / "f.csv", "4,8,15\n16,23,42\n")
    out = tmp_path / "u.safetensors"
    argv = ["unlearn", "--store", store, "--model", str(world["theta0"]), "--forget", str(ids), "--out", str(out),
            "--max-steps", "250", "--lr", "1e-3", "--seed", "5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    (entry,) = read_ledger(AttributionStore.open(store))
    assert "request 1: dmm forgot 6 new ids, 6 in all" in printed
    assert entry.ids == [4, 8, 15, 16, 23, 42] and entry.seed == 5 and entry.config["max_steps"] == 250
    stats = entry.stats  # the matching's own record: loss at start and end, steps (the stopping rule's)
    defaults = MatchingConfig()  # at least the floor and the anneal, at most --max-steps
    assert defaults.min_steps + defaults.anneal_steps <= stats["steps"] <= 250
    assert stats["loss_end"] < stats["loss_start"]
    assert stats["spread"] == 0.0  # the default on a store calibrated without s_x: DM-Direct's mean
    assert (f"matching loss {stats['loss_start']:.3g} -> {stats['loss_end']:.3g} in {stats['steps']} steps, "
            "spread 0 on F") in printed
    assert "above its start" not in printed
    assert entry.output_sha256 == file_sha256(out)

    np.save(tmp_path / "again.npy", np.array([4, 8]))
    assert main(["unlearn", "--store", store, "--model", str(out), "--forget", str(tmp_path / "again.npy"),
                 "--out", str(tmp_path / "u2.safetensors")]) == 0
    assert "all 2 ids are already forgotten; nothing changed" in capsys.readouterr().out

    assert main(["ledger", "--store", store]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].split()[:3] == ["1", entry.time_utc, "dmm"]
    assert entry.output_sha256[:12] in lines[1] and str(out.resolve()) in lines[1]
    assert "loss start" in lines[0] and "loss end" in lines[0] and f" {stats['steps']} " in lines[1]
    assert lines[0].split()[-3:] == ["spread", "output", "path"] and lines[1].split()[-2] == "0"  # DMM's spread a


def test_a_request_whose_matching_loss_rose_says_so_and_how_to_fix_it(world, tmp_path):
    store = copy_store(world["fixture"], tmp_path / "store.zarr")
    wild = MatchingConfig(lr=1.0, min_steps=5, anneal_steps=0, max_steps=5)  # five steps of Adam at lr 1
    result = unlearn_request(store, world["theta0"], [3, 4], out=tmp_path / "u.safetensors", config=wild)
    assert result.stats["loss_end"] > result.stats["loss_start"]
    assert result.message.endswith(" — above its start: the fine-tuning moved away from its targets; lower --lr or "
                                   f"raise --anneal-steps -> {tmp_path / 'u.safetensors'}")


BAD_INPUTS = {
    # name: (argv changes, needle in the one-line error)
    "id out of range": (dict(forget="999999"), "out of range"),
    "negative id": (dict(forget="-1"), "negative"),
    "non-integer id": (dict(forget="3.5"), "not an integer"),
    "duplicated id": (dict(forget="7 7"), "listed 2 times"),
    "no ids": (dict(forget=""), "holds no ids"),
    "held-out id": (dict(forget="N_TRAIN"), "held-out point"),
    "architecture": (dict(model="bad/narrow.safetensors"), "does not fit model"),
    "class count": (dict(model="bad/k11.safetensors"), "num_classes 11 vs store 10"),
    "model name": (dict(model="bad/cnn.safetensors"), 'model "cnn1d" vs store "mlp"'),
    "unreadable model": (dict(model="bad/garbage.safetensors"), "cannot read model file"),
    "missing model": (dict(model="bad/absent.safetensors"), "does not exist"),
    "no fitted datamodels": (dict(store="unfitted", model="theta0"), "no fitted datamodels"),
    "no fitted trak": (dict(extra=["--attribution", "trak"]), "no fitted trak"),
    "store of other data": (dict(store="alien", model="theta0"), "fingerprint"),
    "not the latest model": (dict(model="theta0"), "not the latest"),
    "output over input": (dict(out="u1"), "is the input model"),
    "om without oracles": (dict(extra=["--method", "om"]), "needs --oracles"),
    "unknown method": (dict(extra=["--method", "retrain-everything"]), "unknown method"),
    "bad config": (dict(extra=["--max-steps", "0"]), "min steps <= max steps"),
    "spread, never calibrated": (dict(extra=["--spread", "1"]), "no forget spread"),
    "negative spread": (dict(extra=["--spread", "-0.5"]), "spread -0.5 is not a number >= 0"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_changes_nothing(world, tmp_path, capsys, case):
    change, needle = BAD_INPUTS[case]
    base = world["base"]
    files = {"theta0": world["theta0"], "u1": world["u1"], "unfitted": world["unfitted"], "alien": world["alien"]}
    ids = write_ids(tmp_path / "ids.txt", change.get("forget", "10 11").replace("N_TRAIN", str(world["n_train"])))
    model = change.get("model", "u1")
    out = tmp_path / "out.safetensors"
    argv = ["unlearn", "--store", str(files.get(change.get("store"), world["store"])),
            "--model", str(files[model] if model in files else base / model), "--forget", str(ids),
            "--out", str(files[change["out"]] if "out" in change else out), *change.get("extra", [])]
    watched = [world["store"], world["unfitted"], world["alien"], world["theta0"], world["u1"], world["bad"]]
    before = tree_hashes(*watched)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dmm: error: ") and needle in err[0], err
    assert tree_hashes(*watched) == before and not out.exists()
    assert len(read_ledger(AttributionStore.open(world["store"]))) == 1


def test_two_concurrent_requests_serialise_and_the_ledger_stays_well_formed(world, tmp_path):
    store = copy_store(world["fixture"], tmp_path / "store.zarr")
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    ids = [write_ids(tmp_path / "a.txt", "1 2 3"), write_ids(tmp_path / "b.txt", "4 5 6")]
    with store_lock(AttributionStore.open(store), timeout=1):  # both start while the store is busy
        procs = [subprocess.Popen([sys.executable, "-m", "cluster.cli", "unlearn", "--store", store, "--model",
                                   str(world["theta0"]), "--forget", str(i), "--out", str(o)],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i, o in zip(ids, outs)]
        time.sleep(4)
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, _, err in results if rc == 2).strip().splitlines()
    assert len(loser) == 1 and "not the latest" in loser[0]
    (entry,) = read_ledger(AttributionStore.open(store))
    winner = outs[0] if entry.ids == [1, 2, 3] else outs[1]
    assert entry.output_sha256 == file_sha256(winner) and [o.exists() for o in outs].count(True) == 1
    assert AttributionStore.open(store).zarr_array("ledger/entries").shape == (1,)


def test_direct_writes_theta0_minus_the_forget_rows_and_changes_nothing(world, tmp_path, capsys):
    ids = write_ids(tmp_path / "f.txt", "3 1 4")
    watched = [world["store"], world["theta0"]]
    before = tree_hashes(*watched)
    out_kept, out_model = tmp_path / "kept.npy", tmp_path / "model.npy"
    assert main(["direct", "--store", world["store"], "--forget", str(ids), "--out", str(out_kept)]) == 0
    assert "wrote DM-Direct logits" in capsys.readouterr().out
    assert main(["direct", "--store", world["store"], "--forget", str(ids), "--out", str(out_model),
                 "--model", str(world["theta0"])]) == 0
    store = AttributionStore.open(world["store"])
    weight = store.zarr_array("datamodels/weight")[:]
    expected = store.read_original_logits() - weight[[1, 3, 4]].astype(np.float64).sum(0)
    for out in (out_kept, out_model):
        np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-5)
    assert tree_hashes(*watched) == before

    refused = {"no fitted datamodels": ["--store", world["unfitted"], "--model", str(world["theta0"])],
               "keeps no θ0 logits": ["--store", world["fixture"].url]}
    for needle, argv in refused.items():
        assert main(["direct", *argv, "--forget", str(ids), "--out", str(tmp_path / "x.npy")]) == 2
        assert needle in capsys.readouterr().err and not (tmp_path / "x.npy").exists()
