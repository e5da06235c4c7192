"""benchmarks/bench_training.py --tiny at toy size: both trainers on generated CIFAR-format images, the
summary's JSON line last; GPU-only options refused in one line on a CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = [sys.executable, str(ROOT / "benchmarks" / "bench_training.py"), "--dataset", "cifar10", "--model", "resnet9"]


def test_tiny_bench_prints_both_trainers_and_a_json_ratio_last():
    out = subprocess.run(BENCH + ["--tiny", "--width", "4", "--images", "64", "--models", "2", "--epochs", "1",
                                  "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    row = json.loads(lines[-1])
    assert row["models"] == 2 and row["width"] == 4 and row["images"] == 64 and row["device"] == "cpu"
    assert row["ratio"] > 0 and row["batched_models_per_hour"] > 0 and row["one_at_a_time_models_per_hour"] > 0
    assert 0 < row["batched_gflops"] and row["peak_gflops"] > 0 and row["batched_peak_mib_per_model"] >= 0
    assert row["one_at_a_time_acc"] == row["batched_acc"]  # the same models, trained both ways
    assert any("one at a time" in line for line in lines) and any(line.lstrip().startswith("batched") for line in lines)


def test_gpu_options_are_refused_in_one_line_on_a_cpu():
    for args, needle in ((["--amp", "bf16"], "--amp bf16 is measured on a GPU"), (["--device", "cuda"], "no CUDA"),
                         (["--tiny", "--dataset", "digits"], "--tiny is for")):
        out = subprocess.run(BENCH + args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        last = out.stderr.strip().splitlines()[-1]  # argparse: usage, then one error line
        assert out.returncode == 2 and last.startswith("bench_training.py: error:") and needle in last
