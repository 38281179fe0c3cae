# Switchgear: `make demo` and `make test` bootstrap everything from a bare Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
BUF    := node_modules/.bin/buf

.PHONY: demo test lint-protos protos bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

$(BUF): package.json
	npm install --no-audit --no-fund --silent
	touch $@

demo: $(STAMP)
	$(PY) -m switchgear demo

test: $(STAMP) lint-protos
	$(PY) -m pytest

lint-protos: $(BUF)
	cd protos && ../$(BUF) lint

protos: $(STAMP)
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) node_modules .pytest_cache
