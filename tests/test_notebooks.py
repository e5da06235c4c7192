"""The notebooks run top to bottom on the embedded default and show what they claim."""
import json
from pathlib import Path

import matplotlib
import numpy as np

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(path: Path) -> dict:
    """Execute the code cells of `path` in order in one namespace (as a kernel would) and return it."""
    matplotlib.use("Agg")
    namespace: dict = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(path), "exec"), namespace)
    return namespace


def test_quickstart_predicts_the_effect_of_forgetting():
    ns = run_notebook(NOTEBOOKS / "quickstart.ipynb")
    assert ns["fit"].weight.shape == (ns["data"].n_train, len(ns["forget"]), ns["data"].num_classes)
    assert np.nanmean(ns["fit"].lds_margin) > 0.3
    real, predicted = ns["real_change"], ns["predicted_change"]
    assert real.mean() < 0 and predicted.mean() < 0  # forgetting x lowers x's margin, and DM-Direct says so
    assert np.corrcoef(real, predicted)[0, 1] > 0.3
