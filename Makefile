# The README's commands. Everything runs from .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench soak lint clean images compose-test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The `mlflow server` the tracking tests start (tests/test_tracking.py), in a venv of its own: the
# whole of MLflow pins gunicorn<27 and cryptography<51, which in .venv would hold the service's
# tests to an older gunicorn than its image ships. .venv has MLflow's client only (the tracking extra).
MLFLOW_VENV := .venv-mlflow
$(MLFLOW_VENV)/.installed:
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install --quiet 'mlflow>=3,<4'
	touch $@

# Real CIFAR-10, downloaded once; CIFAR_DATA__URI=path/to/cifar-10-binary.tar.gz uses a local copy.
demo: $(STAMP)
	rm -rf runs/demo
	$(PY) scripts/demo.py

# Two pytest workers, a test file each at a time (module fixtures, such as the
# two-worker cluster, are built once): much of the suite waits on subprocesses,
# servers and S3, so two workers finish well before one on two cores.
TEST_WORKERS ?= 2
test: $(STAMP) $(MLFLOW_VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# Leaves out the tests marked slow (end-to-end training, a real cifar-serve): under a minute on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

bench: $(STAMP)
	$(PY) bench/train_bench.py
	$(PY) bench/fast_bench.py
	$(PY) bench/checkpoint_bench.py
	$(PY) bench/distribute_bench.py
	$(PY) bench/serve_bench.py
	$(PY) bench/serve_memory.py

# Ten minutes of the service at a fixed rate with a hot reload in the middle: apart
# from bench, it is long and wants a quiet machine. SOAK_ARGS="--minutes 1 ..." for a try.
soak: $(STAMP)
	$(PY) bench/soak.py $(SOAK_ARGS)

# Both images, as users get them (a stand-in base from Debian's packages where
# the official Python image cannot be pulled): scripts/images.sh.
images:
	bash scripts/images.sh

# The compose scenario on a real Docker engine (tests/test_compose.py; it runs
# `make images` first): up, kill and resume, SIGTERM, a new version under load,
# drain, two training containers. Also part of `make test` where an engine runs.
compose-test: $(STAMP)
	$(PY) -m pytest -n 0 tests/test_compose.py

lint: $(STAMP)
	$(VENV)/bin/ruff check common job serve tests bench scripts

clean:
	rm -rf runs .pytest_cache
