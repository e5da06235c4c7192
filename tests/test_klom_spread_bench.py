"""benchmarks/klom_spread.py on a report folder the test writes: noise lowers the reference KLoM, raises the other."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = [sys.executable, str(ROOT / "benchmarks" / "klom_spread.py")]


def write_report(out: Path) -> None:
    """margins/random_5_0/: 300 points (100 per group), 40 models each of oracle, floor and dmm from one distribution."""
    folder = out / "margins" / "random_5_0"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    centre = rng.normal(0, 3, 300)
    for name in ("oracle", "floor", "dmm"):
        np.save(folder / f"{name}.npy", (centre + rng.normal(0, 1, (40, 300))).astype(np.float32))
    groups = {"forget": list(range(100)), "retain": list(range(100, 200)), "heldout": list(range(200, 300))}
    (folder / "groups.json").write_text(json.dumps(groups))


def test_noise_scores_lower_in_the_reference_direction_and_higher_in_the_other(tmp_path):
    write_report(tmp_path)
    out = subprocess.run(BENCH + [str(tmp_path), "--set", "random:5:0", "--noise", "1", "--floor-noise", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "klom_spread" and "| retrain + N(0, 1.0²) |" in out.stdout
    for name in ("retrain", "dmm"):
        plain, noisy = result["rows"][name], result["rows"][f"{name} + N(0, 1.0²)"]
        assert sum(noisy["oracle||unlearned"]) < sum(plain["oracle||unlearned"])
        assert sum(noisy["unlearned||oracle"]) > sum(plain["unlearned||oracle"])
        assert all(s > 1.25 for s in noisy["spread"]) and all(abs(s - 1) < 0.15 for s in plain["spread"])


def test_a_forget_set_the_report_lacks_is_a_one_line_error(tmp_path):
    write_report(tmp_path)
    out = subprocess.run(BENCH + [str(tmp_path), "--set", "class:3:50"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "class_3_50" in out.stderr


def test_the_shift_readout_is_the_fraction_of_the_oracles_move_the_method_makes(tmp_path):
    """θ0's margins m0; the oracles' m0 + d; the method's m0 + 0.6·d on F, d on R, −d on H (per point, every model)."""
    write_report(tmp_path)
    folder = tmp_path / "margins" / "random_5_0"
    rng = np.random.default_rng(2)
    original = np.load(folder / "floor.npy")
    d = rng.normal(0, 1, 300)
    np.save(folder / "nothing.npy", original)
    np.save(folder / "oracle.npy", (original + d).astype(np.float32))
    np.save(folder / "dmm.npy", (original + np.concatenate([0.6 * d[:100], d[100:200], -d[200:]])).astype(np.float32))
    out = subprocess.run(BENCH + [str(tmp_path), "--set", "random:5:0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    shift = json.loads(out.stdout.strip().splitlines()[-1])["shift"]
    np.testing.assert_allclose(shift["slope"], [0.6, 1.0, -1.0], atol=1e-5)
    np.testing.assert_allclose(shift["correlation"], [1.0, 1.0, -1.0], atol=1e-5)
    assert "slope F / R / H 0.60 / 1.00 / -1.00" in out.stdout
