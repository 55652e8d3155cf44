# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-deps bench install clean

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

test: test-deps
	$(BIN)/python -m pytest

bench: test-deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) demo-state .pytest_cache
