# fedmount — the two commands a newcomer needs are `make demo` and `make test`.
# Both install what they need on a fresh Debian machine (as root, or with sudo).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

# fuse3 gives fusermount3; libfuse3-dev and pkg-config build pyfuse3; attr gives getfattr.
SYSTEM_PACKAGES := fuse3 libfuse3-dev pkg-config attr gcc python3-dev python3-venv curl ca-certificates
# Containers for fedmount-run and its tests: Docker, bubblewrap, a static busybox for test images.
TEST_SYSTEM_PACKAGES := docker.io bubblewrap busybox-static

.PHONY: demo test bench lint system-deps test-system-deps venv clean

demo: system-deps venv
	$(VENV)/bin/python -m integration.demo

test: system-deps test-system-deps venv
	$(SUDO) integration/ensure_docker.sh
	$(VENV)/bin/python -m ruff check fedmount tests integration bench
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests integration
	$(MAKE) --no-print-directory bench QUICK=1 CHECK_ONLY=1

bench: system-deps venv
	$(VENV)/bin/python -m bench $(if $(FULL),--full) $(if $(CHECK_ONLY),--check-json)

lint: venv
	$(VENV)/bin/python -m ruff check fedmount tests integration bench

# apt-get runs only when a package is missing, so repeated runs cost nothing.
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

test-system-deps:
	@missing=$$(for p in $(TEST_SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py fedmount/blocks/_md5mb.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip wheel
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
