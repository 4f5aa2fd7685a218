# One venv, CPU torch, the package with its dev and eval extras. `make test` and `make demo` work from a fresh clone.
PYTHON ?= python3
# The torch requirement make installs first; where pip would resolve it to a CUDA build, point it at
# PyTorch's CPU-only wheel index: make TORCH="torch==2.13.0 --index-url <that index>"
TORCH ?= torch==2.13.0
# make demo DEMO_ARGS=--smoke: every step shrunk, to check the pipeline in about a minute (what the tests run)
DEMO_ARGS ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU build first, pinned: a plain `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,eval,ray]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m 'slow or not slow'

demo: $(STAMP)
	$(BIN)/python -m gift_merge.demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gift_merge tests benchmarks
	$(BIN)/ruff format --check gift_merge tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy gift_merge

clean:
	rm -rf $(VENV) demo build *.egg-info .pytest_cache .ruff_cache .mypy_cache
