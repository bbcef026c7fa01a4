# The two commands of the README: `make demo` (train -> test -> predict on the embedded synthetic dataset)
# and `make test` (the whole fast test suite). Both create or update the virtual environment in .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: venv demo test test-slow bench clean

venv: $(STAMP)

# torch==2.13.0 is a local CPU build on this kind of machine; installing it first keeps pip from pulling a
# multi-GB CUDA build when lightning / torchio ask for "torch".
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>/dev/null || true
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lightning_flare.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow

clean:
	rm -rf runs cache data/Dataset900_Synthetic
