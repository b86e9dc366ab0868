# relay: `make run` to serve locally, `make test` to run the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint install demo bench reliability clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg setup.py
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/relay init
	$(BIN)/relay db upgrade
	$(BIN)/relay serve --host $(HOST) --port $(PORT) --with-worker

# The type checker and the linter run first: CI runs `make test`.
test: lint
	$(BIN)/pytest -m "not reliability"

demo: $(VENV)/.installed
	$(BIN)/python scripts/demo.py

# Fault-injection scenarios against real processes (tests/reliability); writes its REPORT.md.
reliability: $(VENV)/.installed-test
	RELAY_RELIABILITY_REPORT=tests/reliability/REPORT.md \
		$(BIN)/pytest -m reliability tests/reliability -p no:cacheprovider

# Benchmarks (bench/README.md): bounded in time and count, traffic to 127.0.0.1 only, fresh
# PostgreSQL databases on 127.0.0.1:5432 created and dropped; rewrites bench/RESULTS.md.
BENCH_SECONDS ?= 30
BENCH_ROUNDS ?= 3
bench: $(VENV)/.installed
	@command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null 2>&1 \
		|| { apt-get update -qq && apt-get install -y -qq wrk; }
	$(BIN)/python -m bench.ingest --db postgresql --rounds $(BENCH_ROUNDS) \
		--seconds $(BENCH_SECONDS) --steady-seconds 20
	$(BIN)/python -m bench.ingest --db sqlite --rounds 1 --seconds $(BENCH_SECONDS) --no-bare \
		--steady-seconds 20
	$(BIN)/python -m bench.delivery --db postgresql --runs $(BENCH_ROUNDS) --timeout 90
	$(BIN)/python -m bench.delivery --db sqlite --runs 1 --timeout 90
	$(BIN)/python -m bench.latency --runs $(BENCH_ROUNDS) --seconds 20
	$(BIN)/python -m bench.backlog --drain 20
	$(BIN)/python -m bench.report

# ruff, then mypy (strict, configured in pyproject.toml) on relay/.
lint: $(VENV)/.installed-test
	$(BIN)/ruff check relay tests scripts wsgi.py
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
