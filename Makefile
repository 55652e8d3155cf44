# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-deps audit bench install clean

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

# Known vulnerabilities in the installed dependencies: printed; network trouble never fails it
# (PVSGW_AUDIT_STRICT=1 makes findings fatal).
audit: $(STAMP)
	$(BIN)/python scripts/audit-deps

# Installs its own tools (wrk, caddy, nginx, py-spy) via bench/deps.sh; ~10 minutes; writes bench/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) demo-state .pytest_cache
