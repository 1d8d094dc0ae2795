# `make demo` and `make test` set everything up on a fresh machine: a virtual environment in
# .venv with jact and its dev dependencies, created when missing or when pyproject.toml changes.
PYTHON ?= $(shell .ci/find-python)
VENV := .venv
INSTALLED := $(VENV)/.installed

.PHONY: demo test clean

$(INSTALLED): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(VENV)/bin/jact demo

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
