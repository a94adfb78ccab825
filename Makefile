# blockgraph developer tasks.
#
# The virtualenv is (re)built only when pyproject.toml or this Makefile change.
# torch is pinned to the local CPU wheel and installed FIRST, so that nothing
# later resolves an unpinned torch (which would pull multi-GB CUDA builds).
# timm and torchvision are test-only parity oracles, installed with --no-deps.
# The gpu extra (triton) comes with the test one: without a GPU, Triton's
# interpreter runs the Triton kernels of ms_deform_attn in the tests (triton
# does not depend on torch, so the pinned torch stays).

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
STAMP       := $(VENV)/.stamp

TORCH_VERSION       := 2.13.0
TORCHVISION_VERSION := 0.28.0
TIMM_VERSION        := 1.0.31

LINT_PATHS  := blockgraph tests cli.py bench examples

.DEFAULT_GOAL := demo
.PHONY: demo test lint format venv clean docs

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install -e '.[test,gpu]'
	$(PIP) install --no-deps timm==$(TIMM_VERSION)
	$(PIP) install --no-deps torchvision==$(TORCHVISION_VERSION)
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) cli.py build specs/coat_lite_small.yaml

test: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m pytest -q

docs: $(STAMP)
	$(PY) cli.py docs --all docs

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

format: $(STAMP)
	$(PY) -m ruff check --fix $(LINT_PATHS)
	$(PY) -m ruff format $(LINT_PATHS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis
