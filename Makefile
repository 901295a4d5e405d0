# `make demo` and `make test` set everything up from scratch (Python >= 3.10 is all they need).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out
# The CPU build of torch 2.13.0 installs from the local disk on our machines; elsewhere pip picks a build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" || $(PY) -m pip install --quiet "torch>=2.4"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: install
	$(PY) -m pytest

demo: install
	$(VENV)/bin/mu demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
