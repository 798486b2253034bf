# gspo: `make train` and `make test` bootstrap .venv/ themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; override for a GPU box, e.g. make train TORCH_SPEC='torch==2.13.0' PIP_EXTRA='--index-url ...'
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train test test-trl test-all bench gpu-check clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an open range would pull a multi-GB CUDA build on a CPU machine
	$(BIN)/python -m pip install --quiet $(PIP_EXTRA) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet $(PIP_EXTRA) -e ".[test,slurm]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv/ and install gspo with its dependencies

train: $(STAMP)  ## run `gspo train` with the defaults (extra overrides: make train ARGS='algo=grpo')
	$(BIN)/gspo train $(ARGS)

test: $(STAMP)  ## run the test suite (under 10 minutes on 2 cores)
	$(BIN)/python -m pytest -q $(ARGS)

test-trl: $(VENV)/.installed-bench  ## the test suite with TRL installed (the bench extra): the TRL cross-checks run instead of skipping
	$(BIN)/python -m pytest -q $(ARGS)

test-all: $(STAMP)  ## the test suite plus the slow end-to-end runs
	$(BIN)/python -m pytest -q -m "" $(ARGS)

$(VENV)/.installed-bench: $(STAMP)
	$(BIN)/python -m pip install --quiet $(PIP_EXTRA) -e ".[bench]"
	touch $@

bench: $(VENV)/.installed-bench  ## throughput vs TRL, ~7 min on 2 idle cores (options: make bench ARGS='--pairs 3')
	$(BIN)/python -m bench.run $(ARGS)

gpu-check: $(STAMP)  ## one GPU: Qwen3-0.6B's shape, 1,024-token responses, bf16 over fp32 masters, padded vs packed update, rollout engines vs the decode limit (~8 min; needs a CUDA torch: TORCH_SPEC/PIP_EXTRA)
	$(BIN)/python -m bench.gpu_check $(ARGS)

clean:  ## remove the virtual environment and caches (not outputs/)
	rm -rf $(VENV) .pytest_cache
