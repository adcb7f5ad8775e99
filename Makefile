# Everything a contributor types. Each target creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/inverted_pendulum_fast.yaml
ARGS   ?=
SEEDS  ?= 3

.PHONY: venv train test test-fast lint format docs bench-learning bench-learner bench-throughput bench-scaling clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

## Train GoGePo on CONFIG (default: InvertedPendulum-v5's fast profile, about 2 minutes) on a local Ray instance, tracked in runs/mlflow.db.
train: $(STAMP)
	$(BIN)/gogepo train $(CONFIG) $(ARGS)

## The whole test suite: unit tier, then end-to-end runs on a real local Ray and real MuJoCo.
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

## Unit tier only (no Ray cluster, no training runs).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gogepo_ray tests bench
	$(BIN)/ruff format --check gogepo_ray tests bench

format: $(STAMP)
	$(BIN)/ruff format gogepo_ray tests bench
	$(BIN)/ruff check --fix gogepo_ray tests bench

## The docs site, built strictly into site/ (a broken link or a page left out of the nav fails); docs/cli.md is generated: python -m gogepo_ray.docgen > docs/cli.md
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

## Learning benchmark: SEEDS seeds of CONFIG, JSON in bench/results/.
bench-learning: $(STAMP)
	$(BIN)/python bench/learning.py $(CONFIG) --seeds $(SEEDS) $(ARGS)

## Learner seconds per episode for CONFIG's sizes, fp32 and bf16, 1 and 2 threads (no envs, no Ray).
bench-learner: $(STAMP)
	$(BIN)/python bench/learner_step.py $(CONFIG) $(ARGS)

## Rollout worker env steps/s against the zero-action gym step rate (HalfCheetah-v5, Hopper-v5).
bench-throughput: $(STAMP)
	$(BIN)/python bench/throughput.py $(ARGS)

## Training env steps/s, learner busy fraction and parallel efficiency for 1-8 workers.
bench-scaling: $(STAMP)
	$(BIN)/python bench/scaling.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
