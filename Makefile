# Sluice developer commands.  `make install` then `make run` is the whole quickstart.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: install run test chaos soak lint mypy bench clean all

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'

run:
	$(BIN)/sluice run

test:
	$(BIN)/pytest

# Also part of `make test`: 200 streams while workers and front ends are killed.
chaos:
	$(BIN)/pytest tests/test_chaos.py -rxX

# Not in CI: 30 minutes of mixed load; `sluice soak --minutes 2` for a smoke run.
soak:
	$(BIN)/sluice soak --minutes 30 --out soak-results

lint:
	$(BIN)/ruff check app workers tasks tests
	$(BIN)/mypy

mypy:
	$(BIN)/mypy

bench:
	$(BIN)/sluice bench --start-stack --compare-direct --workers 2 --sockets 1 --sockets 100 --sockets 1000 --out bench-results

all: lint test

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
