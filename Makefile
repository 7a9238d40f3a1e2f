# Setup and the two everyday jobs. `make run` and `make test` each set up .venv first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where the CIFAR-10 files lie in this repository's setup; override with HWCTL_CIFAR10_DIR=...
export HWCTL_CIFAR10_DIR ?= $(abspath ../shared/data/cifar-10-batches-bin)

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned here: 2.13.0 is the CPU build; a looser pin pulls a multi-gigabyte CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/hwctl run examples/resnet32-emulator.toml --out runs/resnet32.h5 --force
	$(BIN)/hwctl summary runs/resnet32.h5
	$(BIN)/hwctl report runs/resnet32.h5 --out runs/resnet32-report

test: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs
