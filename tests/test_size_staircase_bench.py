"""benchmarks/size_staircase.py on a report the test writes: each set's steps, last batch, mean shift and DM-Direct's
mean error, recomputed point by point."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = [sys.executable, str(ROOT / "benchmarks" / "size_staircase.py")]
N_TRAIN, N_POINTS, MODELS = 100, 130, 8
SETS = {"random_10_0": (list(range(10)), 0.5, 0.2), "random_30_0": (list(range(20, 50)), -1.0, 0.0),
        "class_3_40": (list(range(50, 90)), -2.0, -0.5)}  # forget ids, the oracles' shift, DM-Direct's offset


def write_report(out: Path) -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(0, 3, N_POINTS)
    for name, (forget, shift, offset) in SETS.items():
        folder = out / "margins" / name
        folder.mkdir(parents=True)
        groups = {"forget": forget, "retain": [i for i in range(N_TRAIN) if i not in forget],
                  "heldout": list(range(N_TRAIN, N_POINTS))}
        (folder / "groups.json").write_text(json.dumps(groups))
        for population, mean in (("nothing", base), ("oracle", base + shift), ("floor", base + shift),
                                 ("dm-direct", base + shift + offset)):
            np.save(folder / f"{population}.npy", (mean + rng.normal(0, 1, (MODELS, N_POINTS))).astype(np.float32))


def by_hand(folder: Path, keep: list[int]) -> tuple[float, float, float]:
    margins = {p: np.load(folder / f"{p}.npy").astype(np.float64) for p in ("nothing", "oracle", "floor", "dm-direct")}
    shifts, scaled, errors = [], [], []
    for x in keep:
        retrained = np.r_[margins["oracle"][:, x], margins["floor"][:, x]]
        sd = np.std(retrained, ddof=1)
        shift = retrained.mean() - margins["nothing"][:, x].mean()
        shifts.append(shift)
        scaled.append(shift / sd)
        errors.append((margins["dm-direct"][:, x].mean() - retrained.mean()) / sd)
    return float(np.mean(shifts)), float(np.mean(scaled)), float(np.mean(errors))


def test_every_row_is_the_loop_over_the_points_no_set_deletes(tmp_path):
    write_report(tmp_path)
    done = subprocess.run(BENCH + [str(tmp_path), "--batch-size", "16", "--plot", str(tmp_path / "staircase.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "staircase.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    keep = [x for x in range(N_POINTS) if not (x < 10 or 20 <= x < 90)]
    assert result["bench"] == "size_staircase" and result["points"] == len(keep)
    # 90, 70 and 60 points left: ceil(n / 16) steps per epoch, the last batch what remains
    expected_steps = {"random_10_0": (6, 10), "random_30_0": (5, 6), "class_3_40": (4, 12)}
    for name, row in result["sets"].items():
        assert (row["steps_per_epoch"], row["last_batch"]) == expected_steps[name]
        assert row["size"] == len(SETS[name][0])
        np.testing.assert_allclose([row["shift"], row["shift_sd"], row["dm_direct_error_sd"]],
                                   by_hand(tmp_path / "margins" / name, keep), rtol=1e-9)
    assert abs(result["sets"]["class_3_40"]["shift"] + 2.0) < 0.2  # the shift written into the report
    lines = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[1] for line in lines[1:]] == ["10", "30", "40"]  # ordered by size


def test_a_report_without_dm_direct_is_refused_in_one_line(tmp_path):
    write_report(tmp_path)
    (tmp_path / "margins" / "random_30_0" / "dm-direct.npy").unlink()
    done = subprocess.run(BENCH + [str(tmp_path), "--batch-size", "16"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "dm-direct.npy" in done.stderr and len(done.stderr.strip().splitlines()) == 1
