# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-deps lint lower-bound audit bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pvs-gateway demo

# Tools the tests drive for real (Redis, Traefik, an OpenID provider, Chromium, wrk).
test-deps: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" ./scripts/install-test-deps

# Test files run three at a time (-n 3): most of their time is spent waiting on real processes.
test: test-deps
	$(BIN)/python -m pytest -n 3 --dist loadfile

# Style and types: ruff and mypy, as configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/mypy

# The connection layer's tests again on the lowest uvicorn pyproject.toml allows (then back to the newest).
lower-bound: test-deps
	$(BIN)/pip install --quiet "uvicorn==$$(sed -n 's/.*"uvicorn>=\([0-9.]*\)".*/\1/p' pyproject.toml)"
	$(BIN)/python -m pytest -n 2 --dist loadfile tests/test_edge.py tests/test_edge_fuzz.py tests/test_signals.py
	$(BIN)/pip install --quiet --upgrade uvicorn

# Known vulnerabilities in the installed dependencies: printed; network trouble never fails it
# (PVSGW_AUDIT_STRICT=1 makes findings fatal).
audit: $(STAMP)
	$(BIN)/python scripts/audit-deps

# Installs its own tools (wrk, caddy, nginx, py-spy) via bench/deps.sh; ~10 minutes; writes bench/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) demo-state .pytest_cache
