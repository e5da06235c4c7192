# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# What pip installs before the project, so that the project's `torch>=2.2` is already met. The default
# resolves to the CPU build where the package index serves one (as here); public PyPI serves a CUDA
# build on Linux. The CPU build from PyTorch's own index, on any machine:
#   make test TORCH_INSTALL="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_INSTALL ?= torch==2.13.0

.PHONY: demo test evaluate bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first (TORCH_INSTALL), so that pip does not pick a build of its own for the project
	$(PY) -m pip install -q $(TORCH_INSTALL)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dmm demo

test: $(STAMP)
	$(PY) -m pytest

# the full unlearning comparison on digits (configs/digits.yaml): reuses demo_out/store.zarr, builds it if absent
evaluate: $(STAMP)
	$(VENV)/bin/dmm evaluate --config configs/digits.yaml --out eval_out

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV)
