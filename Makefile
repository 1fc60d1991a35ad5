# The two quick-start commands of the README: `make demo` and `make test`.
# Each creates and fills .venv when it is missing (or when pyproject.toml or constraints.txt changed), with the
# exact tested versions of constraints.txt (pyproject.toml states the compatible ranges).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# demo settings (override on the command line: make demo BACKBONE=ViT-B-16 DATA=~/data;
# offline: make demo BACKBONE=RN50-quickgelu PRETRAINED=/path/to/RN50.pt DATA=/path/to/data DATASET=...; OpenAI's
# weights need the QuickGELU model). The demo checks first, in seconds, that the weights and the dataset can be
# had and says in one line which of these to set when not.
BACKBONE ?= RN50
PRETRAINED ?= openai
DATASET ?= torchvision:EuroSAT
DATA ?= $(HOME)/vlprompt-data
SHOTS ?= 16
EPOCHS ?=
OUT ?= runs/demo

.PHONY: venv demo test

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	@$(PY) -m vlprompt.demo --backbone $(BACKBONE) --pretrained $(PRETRAINED) --dataset $(DATASET) \
	    --root $(DATA) --shots $(SHOTS) $(if $(EPOCHS),--epochs $(EPOCHS)) --output $(OUT)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests
