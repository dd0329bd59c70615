# The two set-up commands (README): `make demo` runs the main job, `make test` runs every test.
# Both install what is missing: Debian's FRR, BIRD 2, nftables, iproute2, prometheus (promtool, the lab's
# Prometheus) and etcd-server (the HA tests' etcd) via apt, Python deps in .venv.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: deps system-deps venv test test-loaded unit typecheck layering demo bench deb deb-deps clean

system-deps:
	@if ! [ -x /usr/lib/frr/bgpd ] || ! command -v nft >/dev/null || ! command -v ip >/dev/null \
	    || ! command -v promtool >/dev/null || ! [ -x /usr/sbin/bird ] \
	    || ! [ -d /usr/lib/python3/dist-packages/systemd ] || ! [ -x /usr/bin/etcd ]; then \
	  echo ">> installing FRR, BIRD 2, nftables, iproute2, prometheus (promtool), python3-systemd, etcd (HA tests) from Debian"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq frr bird2 nftables iproute2 procps \
	    prometheus python3-systemd etcd-server >/dev/null; \
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
# (.ci/under-load -n 4 make test-loaded): slower under load, never red. The .deb build and install
# (test_deb.py) checks packaging, not timing, and runs once, in make test.
test-loaded: deps
	$(PY) -m pytest -q -ra -p no:cacheprovider tests/unit tests/integration --deselect tests/integration/test_deb.py

unit: venv
	$(PY) -m pytest -q -ra tests/unit

demo: deps
	$(PY) -m lab.demo $(ARGS)

# Benchmarks (bench/README.md), not part of `make test`: ~10 min, root. make bench ARGS='--quick --json /tmp/b.json'
bench: deps
	$(PY) -m bench all $(ARGS)

# The Debian package (debian/, built by Debian's dh-virtualenv): the daemons in their own
# virtualenv at /opt/anycast, the systemd units, /etc/anycast, the docs in /opt/anycast/doc.
# Built from a copy of the checkout's files (tracked and new, not ignored) in build/deb/src;
# the .deb lands in build/deb/. Needs the Python dependencies from PyPI (or your index).
DEB_DIR := build/deb

deb-deps:
	@if ! dpkg -s debhelper dh-virtualenv python3-venv python3-dev build-essential >/dev/null 2>&1; then \
	  echo ">> installing debhelper, dh-virtualenv, python3-venv, python3-dev, build-essential from Debian"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debhelper dh-virtualenv python3-venv build-essential \
	    python3-dev >/dev/null; \
	fi

deb: deb-deps
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src
	git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c '[ -e "{}" ] && printf "%s\0" "{}"' \
	  | tar --null -T - -cf - | tar -xf - -C $(DEB_DIR)/src
	cd $(DEB_DIR)/src && dpkg-buildpackage -us -uc -b
	@ls $(DEB_DIR)/*.deb

clean:
	rm -rf $(VENV) build *.egg-info
