"""The notebooks run top to bottom on a real Jupyter kernel (nbclient + ipykernel) and show what they claim.

Each test appends one cell that prints, as JSON, the values the notebook's claims rest on; the claims
are checked here on what the kernel computed.
"""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, report: str, timeout: int = 600) -> dict:
    """Run notebook `name` on a python3 kernel (cwd = notebooks/); return the JSON printed by `report`."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(f"import json as _json\nprint(_json.dumps({report}))"))
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    stream = "".join(o.get("text", "") for o in notebook.cells[-1].outputs if o.output_type == "stream")
    return json.loads(stream.strip().splitlines()[-1])


def test_quickstart_predicts_the_effect_of_forgetting():
    values = execute("quickstart.ipynb", "{'shape': list(fit.weight.shape), 'n_train': data.n_train, "
                     "'forget': len(forget), 'k': data.num_classes, 'lds_margin': float(np.nanmean(fit.lds_margin)), "
                     "'real': real_change.tolist(), 'predicted': predicted_change.tolist()}")
    assert values["shape"] == [values["n_train"], values["forget"], values["k"]]
    assert values["lds_margin"] > 0.3
    real, predicted = np.asarray(values["real"]), np.asarray(values["predicted"])
    assert real.mean() < 0 and predicted.mean() < 0  # forgetting x lowers x's margin, and DM-Direct says so
    assert np.corrcoef(real, predicted)[0, 1] > 0.3


def test_klom_notebook_compares_methods_against_the_floor():
    values = execute("klom.ipynb", "{'rows': rows, 'plots': sorted(p.name for p in (work / 'eval').glob('*.png'))}")
    methods = {(r["forget_set"], r["method"]) for r in values["rows"]}
    assert methods == {(fs, m) for fs in ("random:20:0", "class:3:20")
                       for m in ("nothing", "dm-direct", "dmm", "om", "retrain")}
    assert values["plots"] == ["klom_per_group.png", "klom_vs_cost.png", "margin_histograms.png"]
    by = {(r["forget_set"], r["method"]): r for r in values["rows"]}
    # the class forget set moves F's margins: DM-Direct's predictions are closer to the oracles than θ0 is
    assert by[("class:3:20", "dm-direct")]["klom95_forget"] < by[("class:3:20", "nothing")]["klom95_forget"]
