# Entry points for a newcomer (see README): `make smoke`, `make test` and `make lab`.
# Each creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: install smoke test lab strip notebook-params paper paper-inputs paper-clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The smoke study end to end: tiny CPU runs of every router on the embedded synthetic corpus,
# then the analysis notebook (figures/smoke/, paper/tables/smoke/; all git-ignored).
smoke: install
	$(BIN)/python -m moe_core.sweep params/smoke.yaml
	$(BIN)/python -m papermill --no-progress-bar notebooks/analysis_a.ipynb executed/smoke/analysis_a.ipynb \
		-p experiment smoke -p figures_dir figures/smoke -p tables_dir paper/tables/smoke \
		-p numbers_path paper/tables/smoke/numbers_a.tex -y 'solo_bench_dir: null'

# Lint (ruff), then the unit tests and every notebook under nbval.
test: install
	$(BIN)/ruff check moe_core tests
	$(BIN)/python -m pytest -q tests --nbval notebooks; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here" >&2; fi; exit $$rc

# JupyterLab at the study: installs the `notebooks` extra (JupyterLab) into the venv, serves the repository
# (the working directory) on 127.0.0.1:PORT and opens notebooks/. ARGS go to jupyter lab; headless, e.g.
#   make lab PORT=8899 ARGS="--no-browser --IdentityProvider.token=secret"
PORT ?= 8888
ARGS ?=
# jupyter refuses to run as root (containers) without --allow-root
LAB_AS_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
$(VENV)/.lab-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev,notebooks]"
	touch $@

lab: $(VENV)/.lab-installed
	$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.port=$(PORT) --LabApp.default_url=/lab/tree/notebooks \
		$(LAB_AS_ROOT) $(ARGS)

# Clear the outputs and execution counts that a run in JupyterLab leaves in notebooks/ (committed notebooks
# carry none; tests/test_notebooks_clean.py fails until they are stripped).
strip: install
	$(BIN)/python -m nbconvert --log-level=WARN --clear-output --inplace notebooks/*.ipynb

# Rewrite the parameter cell of notebooks/train.ipynb from TrainConfig's fields and defaults
# (tests/test_train.py fails while they differ).
notebook-params: install
	$(BIN)/python -m moe_core.train.notebook notebooks/train.ipynb

# The paper and slides: paper/main.pdf and paper/slides.pdf from the committed generated inputs
# (figures/, paper/tables/, paper/numbers*.tex). Needs TeX Live and latexmk, not Python; on Debian:
#   apt-get install -y --no-install-recommends texlive-latex-base texlive-latex-recommended \
#     texlive-fonts-recommended texlive-pictures latexmk
TEX_PACKAGES := texlive-latex-base texlive-latex-recommended texlive-fonts-recommended texlive-pictures latexmk
LATEXMK ?= latexmk
paper:
	@command -v $(LATEXMK) >/dev/null || { echo "latexmk not found; install: apt-get install -y --no-install-recommends $(TEX_PACKAGES)" >&2; exit 1; }
	cd paper && $(LATEXMK) -pdf -interaction=nonstopmode -halt-on-error -file-line-error main.tex slides.tex

# The paper's generated inputs (figures, tables, number macros) from run records and H100 bench records;
# see README "Reproduce the paper". Only Experiment A (v2) writes the committed destinations (figures/,
# paper/tables/, paper/numbers_*.tex); any other EXPERIMENT (a draft from the smoke study:
# `make paper-inputs EXPERIMENT=smoke`) writes to figures/<experiment>/ and paper/tables/<experiment>/,
# and the notebooks refuse it anywhere else.
EXPERIMENT ?= experiment_a_v2
ifeq ($(EXPERIMENT),experiment_a_v2)
FIGURES_DIR := figures
TABLES_DIR := paper/tables
NUMBERS_DIR := paper
else
FIGURES_DIR := figures/$(EXPERIMENT)
TABLES_DIR := paper/tables/$(EXPERIMENT)
NUMBERS_DIR := $(TABLES_DIR)
endif
BENCH_DIR ?= runs/benchmarks/h100_20261126
# Experiment A's solo timing pass (the train bench over its configurations, one run per GPU): the
# frontier's tokens/s, since the sweep's runs shared their GPUs.
SOLO_DIR ?= runs/benchmarks/h200x4_20261128_5996a0f_solo_v2
# Experiment B's capacity bench with all three routing sources (random, skewed, a trained checkpoint).
CAPACITY_DIR ?= runs/benchmarks/capacity_h200_20261128_a7b3b11_x3
# Expert-parallel bench records: one directory per GPU host and world size, comma-separated.
EP_DIRS ?= runs/benchmarks/h200x2_20261128_3135d0a
PAPER_DIRS := -p experiment $(EXPERIMENT) -p figures_dir $(FIGURES_DIR) -p tables_dir $(TABLES_DIR)
paper-inputs: install
	$(BIN)/python -m papermill --no-progress-bar notebooks/analysis_a.ipynb executed/$(EXPERIMENT)/analysis_a.ipynb \
		$(PAPER_DIRS) -p numbers_path $(NUMBERS_DIR)/numbers_a.tex -p solo_bench_dir $(SOLO_DIR)
	$(BIN)/python -m papermill --no-progress-bar notebooks/analysis_b.ipynb executed/$(EXPERIMENT)/analysis_b.ipynb \
		$(PAPER_DIRS) -p bench_dir $(CAPACITY_DIR) -p numbers_path $(NUMBERS_DIR)/numbers_b.tex
	$(BIN)/python -m moe_core.analysis.paper --bench-dir $(BENCH_DIR) --capacity-dir $(CAPACITY_DIR) \
		--out-dir $(NUMBERS_DIR) --experiment $(EXPERIMENT) --tables-dir $(TABLES_DIR)
	$(BIN)/python -m papermill --no-progress-bar notebooks/expert_parallel.ipynb executed/$(EXPERIMENT)/expert_parallel.ipynb \
		-y '{bench_dirs: [$(EP_DIRS)]}' -p figures_dir $(FIGURES_DIR) -p tables_dir $(TABLES_DIR) \
		-p numbers_path $(NUMBERS_DIR)/numbers_ep.tex

paper-clean:
	cd paper && $(LATEXMK) -C main.tex slides.tex
