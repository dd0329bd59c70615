# The two set-up commands (README): `make demo` runs the main job, `make test` runs every test.
# Both install what is missing: Debian's FRR, BIRD 2, nftables, iproute2 and prometheus (promtool, the lab's
# Prometheus) via apt, Python deps in .venv.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: deps system-deps venv test test-loaded unit typecheck layering demo bench clean

system-deps:
	@if ! [ -x /usr/lib/frr/bgpd ] || ! command -v nft >/dev/null || ! command -v ip >/dev/null \
	    || ! command -v promtool >/dev/null || ! [ -x /usr/sbin/bird ]; then \
	  echo ">> installing FRR, BIRD 2, nftables, iproute2, prometheus (promtool) from Debian"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq frr bird2 nftables iproute2 procps \
	    prometheus >/dev/null; \
	fi

$(STAMP): pyproject.toml
	@echo ">> creating $(VENV) and installing Python dependencies"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

deps: system-deps venv

test: deps typecheck layering
	$(PY) -m pytest -q -ra tests

typecheck: venv
	$(VENV)/bin/mypy

# The import-layering contract in pyproject.toml [tool.importlinter] (which package may import which).
layering: venv
	$(VENV)/bin/lint-imports --no-cache

# The unit and integration tests again, as CI's second run does beside CPU burners
# (.ci/under-load -n 4 make test-loaded): slower under load, never red.
test-loaded: deps
	$(PY) -m pytest -q -ra -p no:cacheprovider tests/unit tests/integration

unit: venv
	$(PY) -m pytest -q -ra tests/unit

demo: deps
	$(PY) -m lab.demo $(ARGS)

# Benchmarks (bench/README.md), not part of `make test`: ~10 min, root. make bench ARGS='--quick --json /tmp/b.json'
bench: deps
	$(PY) -m bench all $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
