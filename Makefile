# whale_pl — `make demo` and `make test` are all a newcomer needs; both set themselves up.
#   make tokenizer|tokens|behavior|dynamics [SCALE=demo|whale_st|whale_x] [ARGS="--trainer.devices 8"]
# A stage target first builds any earlier stage that is missing and resumes an interrupted run;
# `tokens` tokenises the stage data once with the trained tokenizer (runs/$(SCALE)/tokens).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SCALE ?= demo
ARGS ?=
STAMP := $(VENV)/.whale_installed
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl

.PHONY: setup test test-slow demo data tokenizer tokens behavior dynamics experiment mbpo report

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

tokenizer tokens behavior dynamics: $(STAMP)
	$(PY) -m whale_pl.pipeline $@ --scale $(SCALE) -- $(ARGS)

experiment: $(STAMP)
	$(PY) -m whale_pl.pipeline behavior --scale $(SCALE)
	$(PY) -m whale_pl.experiment --scale $(SCALE) --jobs 2

mbpo: $(STAMP)
	$(PY) -m whale_pl.plan --scale $(SCALE)
