# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help demo examples test test-slow test-all test-core bench bench-train bench-train-cost bench-branches paper-speed lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# torch and torchvision come first, pinned: they lie on this machine's disk, and letting
# another package pull torch in would fetch a different multi-GB build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e ".[all,dev]"  # every version pinned: see constraints.txt
	# Two upstream packages the tests read, not import: tflite-support's generated metadata schema (TFLite's own
	# reader of a .tflite's standard metadata) and ultralytics' RepConv/RepVGGDW source. Without their dependencies:
	# tflite-support pins protobuf<4, which onnx cannot use; ultralytics' would pull opencv and more.
	$(PY) -m pip install --quiet --no-deps tflite-support==0.4.4 ultralytics==8.4.190
	touch $(STAMP)

# Each demo gets a folder of its own: train.py refuses a folder that already holds a run.
DEMO = outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)

demo: $(STAMP)  ## train repvgg_a0 on the embedded digits, then convert, verify, quantize to int8 (gated on accuracy), export and time it (outputs/demo/DATE/train/, outputs/demo/DATE/deploy/)
	$(eval RUN := $(DEMO))
	$(PY) train.py model=repvgg_a0 hydra.run.dir=$(RUN)/train
	$(PY) deploy.py ckpt=$(RUN)/train quantize=int8 bench.batch_sizes=[1,16] bench.image_size=224 hydra.run.dir=$(RUN)/deploy

examples: $(STAMP)  ## run every program in examples/ (each checks what it shows and exits non-zero if it does not hold)
	for example in examples/*.py; do $(PY) $$example || exit 1; done

test: $(STAMP)  ## the fast test suite (what a change must pass)
	$(PY) -m pytest -m "not slow"

test-slow: $(STAMP)  ## the slow tests only: the large zoo models (CI runs these too)
	$(PY) -m pytest -m slow

test-all: $(STAMP)  ## every test
	$(PY) -m pytest

# The core alone (torch, safetensors, numpy), in a venv of its own: `pip install repblocks` must give
# working blocks and zoo without Lightning, Hydra or any inference engine.
CORE_VENV := .venv-core
$(CORE_VENV)/.installed: pyproject.toml constraints.txt
	test -x $(CORE_VENV)/bin/python || $(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CORE_VENV)/bin/python -m pip install --quiet torch==2.14.1
	$(CORE_VENV)/bin/python -m pip install --quiet -c constraints.txt -e .
	touch $@

test-core: $(CORE_VENV)/.installed  ## the core library in a venv with only its own dependencies (CI runs this too)
	$(CORE_VENV)/bin/python tests/core_smoke.py

bench: $(STAMP)  ## CPU inference: ours vs timm's RepVGG-A0 (train and deploy form), and ResNet-18 Conv+BN folding
	$(PY) -m benchmarks.compare_timm

bench-train: $(STAMP)  ## CPU training steps/s: ours vs timm's RepVGG-A0, same weights and SGD
	$(PY) -m benchmarks.train_throughput --threads 2

bench-train-cost: $(STAMP)  ## CPU training steps/s and peak memory: plain, offline, online blocks and timm's A0
	$(PY) -m benchmarks.train_cost --threads 2

bench-branches: $(STAMP)  ## accuracy of plain/RepVGG/ACNet/DBB/online training on a hard digits subset, 3 seeds
	$(PY) -m benchmarks.branch_accuracy --threads 2

paper-speed: $(STAMP)  ## the RepVGG paper's speed table: A0-B3 vs ResNet-18..152 (batch 128 on GPU, 8 on CPU)
	$(PY) deploy.py +experiment=paper_speed

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) $(CORE_VENV) .pytest_cache .ruff_cache
