"""benchmarks/additivity.py on a report the test writes: a world whose deletion effects add up exactly, plus a known
interaction on the full set only, so the non-additivity it must find is known."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = [sys.executable, str(ROOT / "benchmarks" / "additivity.py")]
N_TRAIN, N_POINTS = 200, 400  # F: ids 0..99, R: 100..199, held out: 200..399
FORGET = list(range(100))
SPLITS = {"blocks": [FORGET[:50], FORGET[50:]], "odd_even": [FORGET[0::2], FORGET[1::2]]}


def interaction_by_group(f: float, r: float, h: float) -> np.ndarray:
    return np.r_[np.full(100, f), np.full(100, r), np.full(200, h)]


def write_report(out: Path, interaction: np.ndarray, models: int = 50) -> dict[str, str]:
    """margins/<set>/ for the full set F = FORGET and the parts of both splits: a margin is base(x) − Σ_{i deleted}
    A[i, x] + N(0, 1), plus `interaction`(x) when all of F is deleted; returns {split: the --split argument}."""
    rng = np.random.default_rng(0)
    base, effect = rng.normal(0, 3, N_POINTS), rng.normal(0, 0.5, (N_TRAIN, N_POINTS))

    def population(deleted, extra=0.0):
        mean = base - effect[deleted].sum(0) + extra
        return (mean + rng.normal(0, 1, (models, N_POINTS))).astype(np.float32)

    def write(name, deleted, extra=0.0, originals=False):
        folder = out / "margins" / name
        folder.mkdir(parents=True)
        groups = {"forget": deleted, "retain": [i for i in range(N_TRAIN) if i not in deleted],
                  "heldout": list(range(N_TRAIN, N_POINTS))}
        (folder / "groups.json").write_text(json.dumps(groups))
        np.save(folder / "oracle.npy", population(deleted, extra))
        np.save(folder / "floor.npy", population(deleted, extra))
        if originals:  # DM-Direct moves the originals by the exact sum of the deleted points' effects
            originals = population([])
            np.save(folder / "nothing.npy", originals)
            np.save(folder / "dm-direct.npy", originals - effect[deleted].sum(0).astype(np.float32))

    write("random_100_0", FORGET, interaction, originals=True)
    arguments = {}
    for split, parts in SPLITS.items():
        files = []
        for k, part in enumerate(parts):
            path = out / f"{split}{k}.txt"
            np.savetxt(path, part, fmt="%d")
            write(f"ids_{split}{k}", part)
            files.append(str(path))
        arguments[split] = f"{split}=" + ",".join(files)
    return arguments


def run(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(BENCH + [str(out), "--set", "random:100:0", "--splits", "20", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def result_of(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_non_additivity_is_the_interaction_and_the_cut_dependent_part_is_zero(tmp_path):
    # the margins' sd is 1; at 50 models e's own sampling noise has an rms of 0.28, which must not be counted
    arguments = write_report(tmp_path, interaction_by_group(0.5, -0.3, 0.0))
    result = result_of(run(tmp_path, "--split", arguments["blocks"], "--split", arguments["odd_even"],
                           "--models", "10"))
    assert result["bench"] == "additivity" and result["set"] == "random:100:0"
    for split in SPLITS:
        row = result["splits"][split]
        assert row["parts"] == [50, 50]
        np.testing.assert_allclose(row["non_additivity"][:2], [0.5, 0.3], atol=0.04)
        assert row["non_additivity"][2] < 0.12
        np.testing.assert_allclose(row["mean"], [0.5, -0.3, 0.0], atol=0.05)
    # both cuts' parts add up to the same effect here: nothing depends on the cut
    assert max(result["splits"]["odd_even"]["split_dependent_vs_blocks"]) < 0.12
    # DM-Direct here is the exact sum of effects, so its error is minus the interaction: it carries none of it
    np.testing.assert_allclose(result["dm_direct_error"][:2], [0.5, 0.3], atol=0.04)
    for split in SPLITS:
        np.testing.assert_allclose(result["splits"][split]["dm_direct_slope"][:2], [-1.0, -1.0], atol=0.25)


def test_the_parts_population_scores_like_the_oracles_only_where_the_effects_add(tmp_path):
    ratios = {}
    for name, size in (("additive", 0.0), ("interacting", 3.0)):
        folder = tmp_path / name
        arguments = write_report(folder, interaction_by_group(size, 0.0, 0.0), models=150)
        result = result_of(run(folder, "--split", arguments["blocks"], "--models", "100", "--spread"))
        ratios[name] = result["vs_floor"]["parts:blocks"]["median"]
        assert set(result["vs_floor"]) == {"dm-direct", "parts:blocks", "dm-direct+spread", "parts:blocks+spread"}
    assert max(ratios["additive"]) < 1.5
    assert ratios["interacting"][0] > 3 and max(ratios["interacting"][1:]) < 1.5


def test_a_split_that_is_not_a_partition_of_f_is_refused(tmp_path):
    arguments = write_report(tmp_path, interaction_by_group(0.0, 0.0, 0.0))
    first = arguments["blocks"].split("=")[1].split(",")[0]
    done = run(tmp_path, "--split", f"half={first}")
    assert done.returncode != 0 and "not a partition" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = run(tmp_path, "--split", "nofiles")
    assert done.returncode != 0 and "NAME=FILE" in done.stderr
