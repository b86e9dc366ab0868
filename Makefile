# relay: `make run` to serve locally, `make test` to run the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

# Pinned versions with hashes, made from setup.cfg by `make lock` (README, "Dependencies"):
# every install below takes its dependencies from these and nowhere else.
LOCK := requirements.lock
TEST_LOCK := requirements-test.lock

.PHONY: run test lint install demo bench reliability clean lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg setup.py $(LOCK)
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# The test lock holds the runtime pins too (both come from one `make lock`).
$(VENV)/.installed-test: $(BIN)/python setup.cfg setup.py $(TEST_LOCK)
	$(BIN)/pip install --quiet --require-hashes -r $(TEST_LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@ $(VENV)/.installed

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

# Re-resolve both lock files from setup.cfg: the newest versions within its bounds, with the
# hashes of every file PyPI has for them. Review the diff, run `make test`, commit both files.
PIP_COMPILE = $(VENV)-lock/bin/pip-compile --quiet --upgrade --generate-hashes --allow-unsafe \
	--strip-extras --no-emit-index-url --no-emit-find-links
lock:
	test -x $(VENV)-lock/bin/pip-compile || { $(PYTHON) -m venv $(VENV)-lock \
		&& $(VENV)-lock/bin/pip install --quiet pip-tools; }
	$(PIP_COMPILE) --output-file $(LOCK) setup.cfg
	$(PIP_COMPILE) --extra test --output-file $(TEST_LOCK) setup.cfg

clean:
	rm -rf $(VENV) $(VENV)-lock build *.egg-info .pytest_cache .ruff_cache
