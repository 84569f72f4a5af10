# Set-up and everyday commands. On a fresh CPU machine (Python 3.11):
#   make demo   - install into .venv, then run the main job on the embedded `tiny` preset
#   make test   - install into .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of this version lies on the dev/CI machines' disk; GPU users install their own torch.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastgen-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,serve,ray]'
	# NVIDIA's TensorRT 10 and 11 Python bindings (1.3 MB each, no libraries): the TensorRT backend's
	# API-conformance tests load them over stub libraries (tests/engines/tensorrt/trt_bindings.py).
	$(PY) tests/engines/tensorrt/trt_bindings.py
	touch $(STAMP)

demo: install
	$(VENV)/bin/fastgen demo

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_image_ops.py
	$(PY) benchmarks/bench_export.py --preset tiny

lint: install
	$(VENV)/bin/ruff check src kernels tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/fastgen/_C*.so fastgen-out
