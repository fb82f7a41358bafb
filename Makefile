# Two entry points (see README): `make demo` and `make test`. Both create .venv themselves.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A second venv with only the core dependencies (plus pytest): the main job must run from it.
CORE_VENV := .venv-core
CORE_STAMP := $(CORE_VENV)/.installed
SMOLLM2_DIR ?= .cache/smollm2-135m-instruct
CONFIG ?= configs/demo.yaml

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev,convert,math,wandb]'
	touch $(STAMP)

$(CORE_STAMP): pyproject.toml
	test -x $(CORE_VENV)/bin/python || $(PY) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install -q --upgrade pip
	$(CORE_VENV)/bin/python -m pip install -q -e . pytest
	touch $(CORE_STAMP)

.PHONY: setup demo test smollm2 bench lint
setup: $(STAMP)

$(SMOLLM2_DIR)/config.json: | $(STAMP)
	$(VPY) scripts/convert_smollm2.py --out $(SMOLLM2_DIR)

smollm2: $(SMOLLM2_DIR)/config.json

demo: $(STAMP)
	$(VPY) -m jopd.main --config $(CONFIG)

test: $(STAMP) $(CORE_STAMP) smollm2
	JOPD_SMOLLM2_DIR=$(abspath $(SMOLLM2_DIR)) JOPD_CORE_PYTHON=$(abspath $(CORE_VENV))/bin/python \
		$(VPY) -m pytest -q tests

lint: $(STAMP)
	$(VPY) -m ruff check jopd scripts tests
