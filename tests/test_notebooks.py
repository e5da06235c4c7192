"""The notebooks run top to bottom on the embedded default and show what they claim."""
import sys
from pathlib import Path

import numpy as np

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))

from run import run_notebook  # noqa: E402


def test_quickstart_predicts_the_effect_of_forgetting():
    ns = run_notebook(NOTEBOOKS / "quickstart.ipynb")
    assert ns["fit"].weight.shape == (ns["data"].n_train, len(ns["forget"]), ns["data"].num_classes)
    assert np.nanmean(ns["fit"].lds_margin) > 0.3
    real, predicted = ns["real_change"], ns["predicted_change"]
    assert real.mean() < 0 and predicted.mean() < 0  # forgetting x lowers x's margin, and DM-Direct says so
    assert np.corrcoef(real, predicted)[0, 1] > 0.3
