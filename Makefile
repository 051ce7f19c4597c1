# recon3d — developer entry points. Everything installs into ./.venv (torch 2.13.0 CPU first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Passive OpenMP waiting: spin-waiting threads make torch 10-25x slower on shared cores.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test test-slow test-ddp test-gpu lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and exact: a looser spec pulls the CUDA build and several GB of packages.
	$(BIN)/python -m pip install -q torch==2.13.0
	# dev tools + spconv's CPU wheel (the sparse-conv parity reference the tests run; ~11 s, ~25 MB)
	$(BIN)/python -m pip install -q -e ".[dev,sparse]"
	@! $(BIN)/python -c "import torchvision" 2>/dev/null || (echo "torchvision is installed in $(VENV); it breaks transformers/diffusers with the CPU torch: pip uninstall torchvision" && false)
	touch $(STAMP)

install: $(STAMP)

## Train the default method on the embedded synthetic data, evaluate, export (CPU, minutes).
demo: $(STAMP)
	$(BIN)/recon3d demo --out outputs/demo

## The default test suite (CPU): everything except `slow`; `gpu` tests skip with their reason.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow" -q

## Distributed + kill/resume tests on every config, every kill point and the multi-node launch (gloo on CPU).
test-ddp: $(STAMP)
	RECON3D_FULL_MATRIX=1 $(BIN)/python -m pytest -m "ddp" -q -s tests/reliability tests/methods/test_conformance.py

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m "gpu" -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

## Benchmarks print ratios against a reference measured in the same run; the run is appended to
## benchmarks/results/<date>-<commit>.json (recon3d bench --compare FILE: ratios against an earlier one).
bench: $(STAMP)
	$(BIN)/recon3d bench

clean:
	rm -rf $(VENV) outputs .pytest_cache
