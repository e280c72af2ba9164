# fedmed: the two commands of the README, plus a few helpers.
#   make demo   set everything up and run a complete federation on the embedded synthetic cohort
#   make test   set everything up and run the default test suite (< 10 min on 2 CPU cores)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision pair known to work together (CUDA build; runs on CPU too).
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-slow bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/fedmed demo

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m "slow"

bench: setup
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) runs data .pytest_cache
