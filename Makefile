# `make demo` and `make test` set everything up on a fresh machine: a virtual environment in
# .venv with jact and its dev dependencies, created when missing or when pyproject.toml changes.
PYTHON ?= $(shell .ci/find-python)
VENV := .venv
INSTALLED := $(VENV)/.installed
# The dev extra installs JAX's CUDA plugin (to compile for GPU targets without a GPU); without a
# GPU, JAX would try to start CUDA and print an error before falling back to the CPU.
export JAX_PLATFORMS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo cpu)

.PHONY: demo test clean

$(INSTALLED): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(VENV)/bin/jact demo

test: $(INSTALLED)
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
