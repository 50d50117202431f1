# The two commands of the README quick start. Each sets up whatever is missing first.
#   make run    the whole DAG on the embedded default (config/tiny.yaml): ~8 minutes on 2 CPU cores
#               (a fresh clone, set-up included: 7m56s, 2026-12-04)
#   make test   run the test suite (everything; what CI runs)
#   make test-fast   the tests not marked slow (no training beyond seconds, no snakemake/sweep/
#                    torchrun/training subprocess): under 2 minutes on 2 CPU cores
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/tiny.yaml

# Offline by default: a bad local path must never turn into minutes of hub retries.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup run test test-fast bench clean

# torch is pinned first: on a CPU machine 2.13.0 is a local CPU wheel, while an unpinned install
# would pull several GB of CUDA packages.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

run: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores all --config config=$(CONFIG)

test: setup
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) results/*/ results/mlflow.db*
