# snapfs: `make demo` and `make test` set up everything they need on a fresh Debian machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PKGS := build-essential python3-dev python3-venv pkg-config libfuse3-dev fuse3 \
            qemu-utils qemu-system-common zstd fio
PYTEST_ARGS ?=

.PHONY: all deps system-deps venv demo test bench lint clean install

all: test

# Install missing Debian packages only (nothing is downloaded when all are present).
system-deps:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(VENV)/.stamp: pyproject.toml | system-deps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: system-deps $(VENV)/.stamp
deps: venv

demo: deps
	$(PY) -m snapfs.demo

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

# Side by side with qemu-storage-daemon and the raw file; BENCH_ARGS=--quick for a dry run.
bench: deps
	$(PY) -m bench $(BENCH_ARGS)

install: deps
	ln -sf $(CURDIR)/scripts/mount.snapfs /sbin/mount.snapfs
	if [ -d /etc/cinder/rootwrap.d ]; then install -m 0644 cinder_driver/snapfs.filters /etc/cinder/rootwrap.d/; fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
