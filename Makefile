# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help demo test test-slow test-all bench lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# torch and torchvision come first, pinned: they lie on this machine's disk, and letting
# another package pull torch in would fetch a different multi-GB build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## build repvgg_a0, convert it, verify it, time train vs deploy form
	$(PY) examples/convert_repvgg.py

test: $(STAMP)  ## the fast test suite (what a change must pass)
	$(PY) -m pytest -m "not slow"

test-slow: $(STAMP)  ## the slow tests only: the large zoo models (CI runs these too)
	$(PY) -m pytest -m slow

test-all: $(STAMP)  ## every test
	$(PY) -m pytest

bench: $(STAMP)  ## CPU throughput: ours vs timm's RepVGG-A0, and ResNet-18 Conv+BN folding
	$(PY) benchmarks/compare_timm.py

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check repblocks tests benchmarks examples
	$(PY) -m ruff format --check repblocks tests benchmarks examples

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
