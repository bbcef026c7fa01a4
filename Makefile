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
# multi-GB CUDA build when lightning / torchio ask for "torch". constraints.txt pins every package to the versions the
# suite was last run with, so both commands behave the same on a fresh machine next month.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>/dev/null || true
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lightning_flare.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow

clean:
	rm -rf runs cache data/Dataset900_Synthetic

# Benchmark environment for benchmarks/pipeline.py and benchmarks/predict.py (see benchmarks/README.md):
# nnU-Net v2 and MONAI beside this package in .venv-bench. nnunetv2 imports torchvision, and PyPI's torchvision
# does not load beside the local torch 2.13 CPU build, so this venv takes torch 2.14.1 + torchvision 0.29.1
# (from this kind of machine's local wheel index, ~5.5 GB); the second install repeats the pins so that pip
# cannot swap torch.
BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_TORCH := "torch==2.14.1" "torchvision==0.29.1"

.PHONY: bench-env
bench-env: $(BENCH_STAMP)

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q $(BENCH_TORCH)
	$(BENCH_PY) -m pip install -q "nnunetv2==2.8.1" "monai==1.6.1" $(BENCH_TORCH) -e .
	$(BENCH_PY) -c "import torch, torchvision, nnunetv2, monai, lightning_flare; print('bench-env: torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(BENCH_STAMP)
