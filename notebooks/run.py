"""Run a notebook's code cells in order in one namespace, as a kernel would, without Jupyter.

`python notebooks/run.py notebooks/quickstart.ipynb` executes it and stores each cell's printed
output and figures in the file; `tests/test_notebooks.py` runs the same cells and checks the results.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import sys
from pathlib import Path

import matplotlib


def run_notebook(path: str | Path, store_outputs: bool = False) -> dict:
    """Execute the code cells of `path`; return the namespace they leave. Figures are drawn with Agg."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    notebook = json.loads(path.read_text())
    namespace: dict = {}
    code_cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    for count, cell in enumerate(code_cells, start=1):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile("".join(cell["source"]), str(path), "exec"), namespace)
        outputs = []
        if printed.getvalue():
            outputs.append({"name": "stdout", "output_type": "stream",
                            "text": printed.getvalue().splitlines(keepends=True)})
        for number in plt.get_fignums():
            png = io.BytesIO()
            plt.figure(number).savefig(png, format="png", dpi=80)
            plt.close(number)
            outputs.append({"data": {"image/png": base64.b64encode(png.getvalue()).decode(), "text/plain": ["<Figure>"]},
                            "metadata": {}, "output_type": "display_data"})
        cell["outputs"], cell["execution_count"] = outputs, count
    if store_outputs:
        path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    return namespace


if __name__ == "__main__":
    for name in sys.argv[1:]:
        run_notebook(name, store_outputs=True)
        print(f"executed {name}")
