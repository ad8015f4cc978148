# Two commands do all the set-up on a fresh machine:
#   make run    create .venv, install sparsecl, run `sparsecl run` on the bundled default data
#   make test   create .venv, install sparsecl with its test tools, run the test suite
# torch is pinned by constraints.txt (CPU build 2.13.0) so that set-up never pulls CUDA wheels.

PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: setup run test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --constraint constraints.txt --editable '.[test]'
	touch $@

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/sparsecl run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
