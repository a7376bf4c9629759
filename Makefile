# Two entry points for a newcomer (see README): `make smoke` and `make test`.
# Both create .venv on first use and install the project into it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: install smoke test

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The smoke study: tiny CPU runs of every router on the embedded synthetic corpus, end to end.
smoke: install
	$(BIN)/python -m moe_core.sweep params/smoke.yaml

# Unit tests, then every notebook under nbval.
test: install
	$(BIN)/python -m pytest -q tests --nbval notebooks; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here" >&2; fi; exit $$rc
