"""benchmarks/klom_noise.py on report folders the test writes: the splits of the pooled retrained models, by hand."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from matching.klom import klom

ROOT = Path(__file__).resolve().parent.parent
BENCH = [sys.executable, str(ROOT / "benchmarks" / "klom_noise.py")]
GROUPS = {"forget": list(range(30)), "retain": list(range(30, 60)), "heldout": list(range(60, 90))}


def write_set(out: Path, name: str = "random_5_0", shift: float = 4.0) -> Path:
    """margins/<name>/: 90 points, 20 models each of oracle, floor and dm-direct from one distribution; dmm the same
    with F's margins moved by `shift` sd."""
    folder = out / "margins" / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    centre = rng.normal(0, 3, 90)
    for model in ("oracle", "floor", "dm-direct", "dmm"):
        np.save(folder / f"{model}.npy", (centre + rng.normal(0, 1, (20, 90))).astype(np.float32))
    np.save(folder / "dmm.npy", np.load(folder / "dmm.npy") + np.r_[np.full(30, shift), np.zeros(60)].astype(np.float32))
    (folder / "groups.json").write_text(json.dumps(GROUPS))
    return folder


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(BENCH + list(args), cwd=ROOT, capture_output=True, text=True, timeout=120)


def by_hand(folder: Path, splits: int, seed: int, direction: str = "oracle||unlearned") -> dict:
    """Per split, KLoM95 per group of the floor half and of each method against the oracle half, in a loop."""
    pool = np.concatenate([np.load(folder / "oracle.npy"), np.load(folder / "floor.npy")])
    rng = np.random.default_rng(seed)
    out = {"floor": [], "dm-direct": [], "dmm": []}
    for _ in range(splits):
        order = rng.permutation(40)
        reference, rest = pool[order[:20]], pool[order[20:]]
        for name, margins in (("floor", rest), ("dm-direct", np.load(folder / "dm-direct.npy")),
                              ("dmm", np.load(folder / "dmm.npy"))):
            values = klom(reference, margins, direction=direction)
            out[name].append([np.percentile(values[idx], 95) for idx in GROUPS.values()])
    return {name: np.array(v) for name, v in out.items()}


def test_every_split_and_ratio_is_the_loop_over_the_pooled_retrained_models(tmp_path):
    folder = write_set(tmp_path)
    out = run(str(tmp_path), "--splits", "3", "--seed", "5")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "klom_noise" and result["splits"] == 3
    readout, expected = result["sets"]["random_5_0"], by_hand(folder, 3, 5)
    np.testing.assert_allclose(readout["retrain"]["klom95"]["median"], np.median(expected["floor"], 0), rtol=1e-9)
    for name in ("dm-direct", "dmm"):
        np.testing.assert_allclose(readout[name]["klom95"]["median"], np.median(expected[name], 0), rtol=1e-9)
        np.testing.assert_allclose(readout[name]["klom95"]["p90"], np.percentile(expected[name], 90, 0), rtol=1e-9)
        np.testing.assert_allclose(readout[name]["vs_floor"]["median"],
                                   np.median(expected[name] / expected["floor"], 0), rtol=1e-9)
        np.testing.assert_allclose(readout[name]["vs_dm-direct"]["p10"],
                                   np.percentile(expected[name] / expected["dm-direct"], 10, 0), rtol=1e-9)
    report = [np.percentile(klom(np.load(folder / "oracle.npy"), np.load(folder / "dmm.npy"))[idx], 95)
              for idx in GROUPS.values()]
    np.testing.assert_allclose(readout["dmm"]["report"], report, rtol=1e-9)


def test_either_direction_is_the_same_loop_over_the_splits(tmp_path):
    folder = write_set(tmp_path, shift=1.0)
    readouts = {}
    for direction in ("oracle||unlearned", "unlearned||oracle"):
        out = run(str(tmp_path), "--splits", "4", "--seed", "3", "--direction", direction)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["direction"] == direction and f"KL({direction.replace('||', ' ‖ ')})" in out.stdout
        readouts[direction] = readout = result["sets"]["random_5_0"]
        expected = by_hand(folder, 4, 3, direction)
        np.testing.assert_allclose(readout["retrain"]["klom95"]["median"], np.median(expected["floor"], 0), rtol=1e-9)
        np.testing.assert_allclose(readout["dmm"]["vs_floor"]["p90"],
                                   np.percentile(expected["dmm"] / expected["floor"], 90, 0), rtol=1e-9)
    assert readouts["oracle||unlearned"]["dmm"]["report"] != readouts["unlearned||oracle"]["dmm"]["report"]


def test_a_shift_on_forget_shows_in_forget_only(tmp_path):
    write_set(tmp_path, shift=4.0)
    out = run(str(tmp_path), "--set", "random:5:0", "--splits", "20", "--methods", "dmm")
    assert out.returncode == 0, out.stderr
    dmm = json.loads(out.stdout.strip().splitlines()[-1])["sets"]["random_5_0"]["dmm"]
    forget, retain, heldout = dmm["vs_floor"]["median"]
    assert dmm["klom95"]["median"][0] > 9  # 20 models against 20: disjoint samples sit near KLoM's ceiling
    assert forget > 1.8 and 0.7 < retain < 1.4 and 0.7 < heldout < 1.4
    assert dmm["vs_dm-direct"]["p10"][0] > 1.5 and dmm["vs_dm-direct"]["p90"][1] < 1.4
    assert "| dmm |" in out.stdout and "| dm-direct |" not in out.stdout  # dm-direct scored, as --versus, not shown


def test_a_report_without_the_floor_or_a_method_is_a_one_line_error(tmp_path):
    folder = write_set(tmp_path)
    out = run(str(tmp_path), "--methods", "om")
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "om" in out.stderr
    (folder / "floor.npy").unlink()
    out = run(str(tmp_path))
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "floor.npy" in out.stderr


def test_models_draws_that_many_of_every_population_and_of_the_oracles(tmp_path):
    folder = write_set(tmp_path, shift=1.0)
    out = run(str(tmp_path), "--splits", "3", "--seed", "2", "--models", "8")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["models"] == 8 and "of 8 oracles and 8 models per population" in out.stdout
    pool = np.concatenate([np.load(folder / "oracle.npy"), np.load(folder / "floor.npy")])
    populations = {name: np.load(folder / f"{name}.npy") for name in ("dm-direct", "dmm")}
    rng = np.random.default_rng(2)
    expected = {"floor": [], "dm-direct": [], "dmm": []}
    for _ in range(3):  # the loop by hand: 8 of the 40 retrained as oracles, 8 others as the floor, 8 of 20 models
        order = rng.permutation(40)
        reference = pool[order[:8]]
        rows = np.sort(rng.choice(20, 8, replace=False))
        for name, margins in (("floor", pool[order[8:16]]), ("dm-direct", populations["dm-direct"][rows]),
                              ("dmm", populations["dmm"][rows])):
            values = klom(reference, margins)
            expected[name].append([np.percentile(values[idx], 95) for idx in GROUPS.values()])
    readout = result["sets"]["random_5_0"]
    np.testing.assert_allclose(readout["retrain"]["klom95"]["median"], np.median(expected["floor"], 0), rtol=1e-9)
    np.testing.assert_allclose(readout["dmm"]["vs_dm-direct"]["median"],
                               np.median(np.array(expected["dmm"]) / np.array(expected["dm-direct"]), 0), rtol=1e-9)
    # the report's own column is the full report's, and 20 or more models per population is refused
    whole = json.loads(run(str(tmp_path), "--splits", "3").stdout.strip().splitlines()[-1])
    assert readout["dmm"]["report"] == whole["sets"]["random_5_0"]["dmm"]["report"]
    refused = run(str(tmp_path), "--models", "20")
    assert refused.returncode != 0 and "--models 20" in refused.stderr and refused.stderr.strip().count("\n") == 0
