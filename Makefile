# The two quick-start commands of the README: `make demo` and `make test`.
# Each creates and fills .venv when it is missing (or when pyproject.toml changed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# demo settings (override on the command line: make demo BACKBONE=ViT-B-16 DATA=~/data)
BACKBONE ?= RN50
PRETRAINED ?= openai
DATASET ?= torchvision:EuroSAT
DATA ?= $(HOME)/vlprompt-data
SHOTS ?= 16
OUT ?= runs/demo

.PHONY: venv demo test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m vlprompt.demo --backbone $(BACKBONE) --pretrained $(PRETRAINED) --dataset $(DATASET) \
	    --root $(DATA) --shots $(SHOTS) --output $(OUT)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests
