# Every user-facing target runs `setup` first, so `make demo` or `make test` is all a new user types.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: setup demo test bench lint mlflow-ui clean

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

clean:
	rm -rf $(VENV) .moray .pytest_cache
