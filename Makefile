# Every target bootstraps .venv when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= recipes/default.yaml
# Extra dotted overrides, e.g. ARGS="selfgen.batch_size=4 model.dtype=float32"
ARGS ?=
# accelerate launch options, e.g. LAUNCH="--num_processes 2 --cpu" or --config_file recipes/accelerate/ddp.yaml
# (--quiet, always passed: a stage that fails prints its own one-line error, not accelerate's traceback too)
LAUNCH ?= --config_file recipes/accelerate/single.yaml
export STIC_CACHE ?= $(CURDIR)/.cache/stic
export HF_HUB_DISABLE_TELEMETRY = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install demo demo-full demo-methods demo-beyond selfgen dpo infuse-sft eval merge rounds test test-all bench-selfgen bench-dpo preflight preflight-report gpu-check gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -c "import torch, torchvision; from torchvision.transforms import v2; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	# fill the recipe-key caches (make's and a plain `stic`'s): later help and recipe typos skip TRL's imports
	$(BIN)/stic dpo --help > /dev/null
	env -u STIC_CACHE $(BIN)/stic dpo --help > /dev/null
	touch $(STAMP)

install: $(STAMP)

# The STIC experiment in miniature on ShapesWorld (committed base checkpoint), about 10 minutes on 2 cores.
# WORLD=path/to/world.yaml runs it in another world (its base is pretrained once and cached by the file's digest).
DEMO_ARGS ?=
WORLD ?=
demo: $(STAMP)
	$(BIN)/python -m stic.shapes.demo $(if $(WORLD),--world $(WORLD)) $(DEMO_ARGS)

# The same with every ablation of the paper's Tables 2 and 3 in miniature (longer).
demo-full: $(STAMP)
	$(BIN)/python -m stic.shapes.demo --ablations --out outputs/demo-full $(if $(WORLD),--world $(WORLD)) $(DEMO_ARGS)

# Issue 23's pre-registered comparison of pair constructions (recipes/shapesworld/hypotheses-methods.md).
demo-methods: $(STAMP)
	$(BIN)/python -m stic.shapes.demo --methods $(if $(WORLD),--world $(WORLD)) $(DEMO_ARGS)

# Issue 24's pre-registered run: self-question pairs, a yes:no-balanced stage 2, 3 rounds
# (recipes/shapesworld/hypotheses-beyond.md).
demo-beyond: $(STAMP)
	$(BIN)/python -m stic.shapes.demo --beyond $(if $(WORLD),--world $(WORLD)) $(DEMO_ARGS)

selfgen: $(STAMP)
	$(BIN)/accelerate launch --quiet $(LAUNCH) -m stic selfgen --recipe $(RECIPE) $(ARGS)

dpo: $(STAMP)
	$(BIN)/accelerate launch --quiet $(LAUNCH) -m stic dpo --recipe $(RECIPE) $(ARGS)

infuse-sft: $(STAMP)
	$(BIN)/accelerate launch --quiet $(LAUNCH) -m stic infuse-sft --recipe $(RECIPE) $(ARGS)

# make eval MODEL=stage1 EVAL_ARGS="--dar --benchmarks pope scienceqa"
# The default recipe reads a self-made fixture of every benchmark (its eval.data_root), written here when missing.
MODEL ?= base
EVAL_ARGS ?=
EVAL_FIXTURE := outputs/default/eval_fixture
eval: $(STAMP)
	$(if $(filter recipes/default.yaml,$(RECIPE)),$(BIN)/python -m stic.eval_fixtures $(EVAL_FIXTURE))
	$(BIN)/accelerate launch --quiet $(LAUNCH) eval/run.py --recipe $(RECIPE) --model $(MODEL) $(EVAL_ARGS) $(ARGS)

# selfgen, stage 1, eval and merge, repeated: make rounds ROUNDS=3 (each round generates with the last merged model;
# a rerun resumes at the last finished step). Default: the recipe's rounds.count. Output: its rounds.output_dir.
ROUNDS ?=
rounds: $(STAMP)
	$(if $(filter recipes/default.yaml,$(RECIPE)),$(BIN)/python -m stic.eval_fixtures $(EVAL_FIXTURE))
	$(BIN)/accelerate launch --quiet $(LAUNCH) -m stic rounds --recipe $(RECIPE) $(if $(ROUNDS),--rounds $(ROUNDS)) $(ARGS)

# Standalone model folder from the stage-1 adapter: make merge MERGED=outputs/merged
MERGED ?= outputs/merged
merge: $(STAMP)
	$(BIN)/stic merge --recipe $(RECIPE) -o $(MERGED) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

bench-selfgen: $(STAMP)
	$(BIN)/python -m stic.bench.selfgen $(ARGS)

bench-dpo: $(STAMP)
	$(BIN)/python -m stic.bench.dpo $(ARGS)

# make preflight RECIPE=recipes/X.yaml [STAGE=selfgen|dpo|infuse-sft|eval|all]: a stage's wiring, and its memory,
# checked on the recipe's data and model before a run
STAGE ?= dpo
preflight: $(STAMP)
	$(if $(filter recipes/default.yaml,$(RECIPE)),$(if $(filter eval all,$(STAGE)),$(BIN)/python -m stic.eval_fixtures $(EVAL_FIXTURE)))
	$(BIN)/stic preflight --recipe $(RECIPE) --stage $(STAGE) $(ARGS)

# the mutation matrix: each fault preflight guards against, injected, and the check that catches it
preflight-report: $(STAMP)
	$(BIN)/python -m stic.bench.preflight $(ARGS)

# The GPU check (README: "GPU check"): real-shaped 7B models with random weights, built in code, through preflight,
# selfgen and stage 1 (LoRA, QLoRA, FSDP). On a bare GPU machine (no .venv, no network) run it with that
# machine's python and the wheels of gpu-wheels: make gpu-check GPU_PY=python3 ARGS="--layers 8"
GPU_PY ?= $(BIN)/python
gpu-check: $(if $(filter $(BIN)/python,$(GPU_PY)),$(STAMP))
	$(GPU_PY) -m stic.bench.gpu_check $(ARGS)

# Wheels, for that machine's Python (GPU_PY_VERSION), of the pinned packages a GPU image lacks or holds in other
# versions (torch and torchvision stay the image's: they must match its CUDA), into the git-ignored .whl/
GPU_PY_VERSION ?= 3.12
GPU_WHEELS ?= transformers==5.23.0 trl==1.16.0 peft==0.21.2 accelerate==1.15.0 datasets==5.2.0 \
	bitsandbytes==0.50.2 tokenizers==0.23.3 dill==0.4.1 multiprocess==0.70.19
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version $(GPU_PY_VERSION) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf outputs .cache
