# Everything the project needs is installed by these targets into .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test lint typecheck demo bench bench-compare clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,getstream]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

test: lint typecheck
	$(PY) -m pytest

# The service in development with offline stand-ins; prints the generated API key.
demo: $(STAMP)
	ENVIRONMENT=development $(PY) -m server

bench: $(STAMP)
	$(PY) benchmarks/pipeline_overhead.py --stages 8 --frames 5000 --json

clean:
	rm -rf $(VENV)

# The comparison needs Pipecat, which is not a dependency of the project (the bench extra).
bench-compare: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,getstream,bench]'
	$(PY) benchmarks/pipeline_overhead.py --stages 8 --frames 20000 --compare pipecat --json
	$(PY) benchmarks/pipeline_overhead.py --stages 8 --frames 5000 --paced --compare pipecat --json
