# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv, install
# torch and the build requirements, and build stochgate against that torch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch 2.14.1 is the CUDA 13.0 build that this machine's pip takes from local disk; the
# extension is compiled against it (CUDA kernels too whenever nvcc is found).
TORCH_SPEC ?= torch==2.14.1
# Serialises builds when several shells share one build tree.
LOCK := flock /tmp/stochgate-build.lock

.PHONY: all venv build test test-fast demo bench reproduce clean

all: test

$(VENV)/.deps-stamp:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_SPEC)" numpy tqdm matplotlib pytest scipy \
	    "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja
	touch $@

venv: $(VENV)/.deps-stamp

# --no-build-isolation: compile against the torch in .venv, not a freshly downloaded one.
build: venv
	$(LOCK) $(PIP) install --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q -ra

test-fast: build
	$(PY) -m pytest -q -ra -m "not slow"

# The estimator demo, then the quick MNIST reproduction (fetches and caches MNIST first).
demo: build
	$(PY) -m stochgate.cli demo
	$(PY) -m stochgate.cli reproduce --quick --out reproduce-results

clean:
	rm -rf build $(VENV)
