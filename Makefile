# fedmed: the two commands of the README, plus a few helpers.
#   make demo   set everything up and run a complete federation on the embedded synthetic cohort
#   make test   set everything up and run the default test suite (8-14 min on 2 CPU cores)
#   make lint   ruff (lint + import order) on the repo and mypy on the fedmed package
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision pair known to work together (CUDA build; runs on CPU too).
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-slow lint bench bench-peers-setup bench-peers bench-peers-heart bench-dp clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

# the pinned lint tools (pyproject's `lint` extra) on top of setup
$(BIN)/.lint-installed: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e ".[test,lint]"
	touch $@

demo: setup
	$(BIN)/fedmed demo

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m "slow"

lint: $(BIN)/.lint-installed
	$(BIN)/python -m ruff check .
	$(BIN)/python .ci/typecheck.py

bench: setup
	$(BIN)/python -m benchmarks

# fedmed against a plain Flower app and NVIDIA FLARE on the same job (issue 18). The peers get
# their own venv, so their dependencies never touch fedmed's: its own torch, flwr, nvflare, and
# fedmed itself with --no-deps (the peers train fedmed's model on fedmed's data).
PEERS := .venv-peers
$(PEERS)/.installed: benchmarks/peers/requirements.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q -r benchmarks/peers/requirements.txt
	$(PEERS)/bin/python -m pip install -q --no-deps -e . -e benchmarks/peers/flower_app
	touch $@

bench-peers-setup: $(PEERS)/.installed

bench-peers: setup bench-peers-setup
	$(BIN)/python -m benchmarks.peers.run --repeats 3

# the same comparison on real data: UCI heart disease's four hospitals (needs ../shared/data)
bench-peers-heart: setup bench-peers-setup
	$(BIN)/python -m benchmarks.peers.run --job heart --repeats 3

bench-dp: setup
	$(BIN)/python -m benchmarks.dp_cost --repeats 7 --doc docs/benchmarks.md

clean:
	rm -rf $(VENV) $(PEERS) runs data .pytest_cache
