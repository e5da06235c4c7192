"""benchmarks/bench_matching_step.py: its two sides train the same head to the same parameters, and it ends in JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_matching_step as bench  # noqa: E402
import torch  # noqa: E402


def test_both_sides_reach_the_same_parameters_and_the_last_line_is_json(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_matching_step.py", "--steps", "40", "--repeats", "1",
                                     "--threads", str(torch.get_num_threads())])
    bench.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "matching_step" and result["autograd_ms"] > 0 and result["written_out_ms"] > 0
    assert result["max_param_diff"] <= 1e-6
