# whale_pl — `make demo` and `make test` are all a newcomer needs; both set themselves up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SCALE ?= demo
STAMP := $(VENV)/.whale_installed
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl

.PHONY: setup test test-slow demo data tokenizer behavior dynamics clean-runs

$(STAMP): pyproject.toml scripts/setup_venv.sh
	@bash scripts/setup_venv.sh
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) -m whale_pl.demo

data: $(STAMP)
	$(VENV)/bin/whale-data metaworld --config stages/$(SCALE)/data.yaml
