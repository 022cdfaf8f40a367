# Every target bootstraps .venv when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= recipes/default.yaml
# Extra dotted overrides, e.g. ARGS="selfgen.batch_size=4 model.dtype=float32"
ARGS ?=
# accelerate launch options, e.g. LAUNCH="--num_processes 2 --cpu" or --config_file recipes/accelerate/ddp.yaml
LAUNCH ?= --config_file recipes/accelerate/single.yaml
export STIC_CACHE ?= $(CURDIR)/.cache/stic
export HF_HUB_DISABLE_TELEMETRY = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install selfgen test test-all bench-selfgen clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -c "import torch, torchvision; from torchvision.transforms import v2; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

install: $(STAMP)

selfgen: $(STAMP)
	$(BIN)/accelerate launch $(LAUNCH) -m stic selfgen --recipe $(RECIPE) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

bench-selfgen: $(STAMP)
	$(BIN)/python -m stic.bench_selfgen $(ARGS)

clean:
	rm -rf outputs .cache
