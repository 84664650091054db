# Every user-facing target runs `setup` first, so `make demo` or `make test` is all a new user types.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: setup demo test bench lint mlflow-ui infra clean

MORAY_HOME ?= .moray

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned first: an unpinned resolve would pull a multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The benchmarks also need the `bench` extra (datatrove, side by side with the curation job);
# `make test` and CI install only `.[test]`.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,bench]'
	touch $(BENCH_STAMP)

demo: setup
	$(BIN)/python -m moray.jobs.demo

test: setup
	$(BIN)/python -m pytest -q --durations=25 tests

bench: setup $(BENCH_STAMP)
	$(BIN)/python benchmarks/run_all.py

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(MORAY_HOME))/mlflow.db --host 127.0.0.1 --port 5000

lint: setup
	$(BIN)/ruff check moray tests benchmarks
	$(BIN)/ruff format --check moray tests benchmarks

# infra/*.yaml are `moray deploy --dry-run` renderings (tests/platform/test_deploy.py checks they match)
DEPLOY := $(BIN)/python -m moray.platform.deploy
INFRA := --dry-run --no-auth-secret --data-pvc moray-shared
infra: setup
	$(DEPLOY) cluster $(INFRA) > infra/raycluster.yaml
	$(DEPLOY) curate $(INFRA) --set output=/shared/curated/default > infra/rayjob-curate.yaml
	$(DEPLOY) pretrain $(INFRA) --storage /shared/runs --set data.path=/shared/curated/default > infra/rayjob-pretrain.yaml
	$(DEPLOY) eval $(INFRA) -- --model models:/moray-tiny@champion --tasks wikitext,mmlu,gsm8k,humaneval --limit 200 > infra/rayjob-eval.yaml
	$(DEPLOY) serve $(INFRA) --model models:/moray-tiny@champion > infra/rayservice-serve.yaml
	$(DEPLOY) serve $(INFRA) --model models:/moray-tiny@champion --mode horizontal > infra/rayservice-horizontal.yaml
	$(DEPLOY) serve $(INFRA) --model models:/moray-tiny@champion --mode hybrid > infra/rayservice-hybrid.yaml
	$(DEPLOY) serve $(INFRA) --model models:/moray-tiny@champion --mode pipeline > infra/rayservice-pipeline.yaml

clean:
	rm -rf $(VENV) .moray .pytest_cache
