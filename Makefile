# fedmount — the two commands a newcomer needs are `make demo` and `make test`.
# Both install what they need on a fresh Debian machine (as root, or with sudo).
# `sudo make install` installs fedmount for real use (PREFIX=/usr/local; a user without
# root: make install PREFIX=~/.local); `make uninstall` with the same PREFIX removes it.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
PREFIX ?= /usr/local
# The installed fedmount lives in a virtualenv of its own; PREFIX/bin and
# PREFIX/share/man/man1 get links to its commands and man pages.
INSTALL_VENV = $(PREFIX)/lib/fedmount
COMMANDS := fedmount fedmount-run

# fuse3 gives fusermount3; libfuse3-dev and pkg-config build pyfuse3; attr gives getfattr.
SYSTEM_PACKAGES := fuse3 libfuse3-dev pkg-config attr gcc python3-dev python3-venv curl ca-certificates
# Containers for fedmount-run and its tests: Docker, bubblewrap, a static busybox for test images;
# libfuse-dev (libfuse 2) and pkg-config build arvados-llfuse for the real arv-mount of the conformance tests;
# man-db gives `man`, which integration/test_install.py needs to find the installed man pages.
TEST_SYSTEM_PACKAGES := docker.io bubblewrap busybox-static libfuse-dev pkg-config man-db
# The real arv-mount (arvados-fuse, PyPI) in a virtualenv of its own, for conformance tests and benchmarks.
ARV_MOUNT_VENV ?= .venv-arv-mount
ARV_MOUNT_VERSION := 3.2.1
# The real crunchstat-summary (PyPI) in a virtualenv of its own: it reads the crunchstat lines of a mount's log.
CRUNCHSTAT_SUMMARY_VENV ?= .venv-crunchstat-summary

.PHONY: demo test bench lint install uninstall arv-mount-link system-deps test-system-deps venv arv-mount crunchstat-summary clean

demo: system-deps venv
	$(VENV)/bin/python -m integration.demo

test: system-deps test-system-deps venv arv-mount crunchstat-summary
	$(SUDO) integration/ensure_docker.sh
	$(VENV)/bin/python -m ruff check fedmount tests integration bench
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests integration
	$(MAKE) --no-print-directory bench QUICK=1 CHECK_ONLY=1

bench: system-deps venv arv-mount
	$(VENV)/bin/python -m bench $(if $(FULL),--full) $(if $(CHECK_ONLY),--check-json --no-arv-mount)

lint: venv
	$(VENV)/bin/python -m ruff check fedmount tests integration bench

install: system-deps
	@dir=$(PREFIX); while [ ! -e "$$dir" ]; do dir=$$(dirname "$$dir"); done; \
	[ -w "$$dir" ] || { echo "make install: cannot write to $(PREFIX): run sudo make install, or make install PREFIX=~/.local" >&2; exit 1; }
	$(PYTHON) -m venv $(INSTALL_VENV)
	$(INSTALL_VENV)/bin/pip install -q --upgrade pip
	$(INSTALL_VENV)/bin/pip install -q .
	mkdir -p $(PREFIX)/bin $(PREFIX)/share/man/man1
	for c in $(COMMANDS); do \
	  ln -sfn $(INSTALL_VENV)/bin/$$c $(PREFIX)/bin/$$c && \
	  ln -sfn $(INSTALL_VENV)/share/man/man1/$$c.1 $(PREFIX)/share/man/man1/$$c.1 || exit 1; \
	done
	ln -sfn $(INSTALL_VENV)/bin/fedmount-arv-mount $(PREFIX)/bin/fedmount-arv-mount
	@echo "installed $(COMMANDS) in $(PREFIX)/bin and their man pages in $(PREFIX)/share/man/man1"
	@echo "fedmount-arv-mount is fedmount under arv-mount's command line; make arv-mount-link names it arv-mount"

uninstall:
	for c in $(COMMANDS); do rm -f $(PREFIX)/bin/$$c $(PREFIX)/share/man/man1/$$c.1; done
	rm -f $(PREFIX)/bin/fedmount-arv-mount
	[ "$$(readlink $(PREFIX)/bin/arv-mount 2>/dev/null)" != fedmount-arv-mount ] || rm -f $(PREFIX)/bin/arv-mount
	rm -rf $(INSTALL_VENV)

# fedmount as crunch-run's arv-mount: PREFIX/bin/arv-mount -> fedmount-arv-mount (after make install),
# never over an arv-mount that is not this link.
arv-mount-link:
	@[ -x $(PREFIX)/bin/fedmount-arv-mount ] || { echo "make arv-mount-link: run make install first (PREFIX=$(PREFIX))" >&2; exit 1; }
	@if [ -e $(PREFIX)/bin/arv-mount ] && [ "$$(readlink $(PREFIX)/bin/arv-mount)" != fedmount-arv-mount ]; then \
	  echo "make arv-mount-link: $(PREFIX)/bin/arv-mount exists and is not fedmount's link; not replacing it" >&2; exit 1; fi
	ln -sfn fedmount-arv-mount $(PREFIX)/bin/arv-mount

# apt-get runs only when a package is missing, so repeated runs cost nothing. On a fresh
# cloud machine another apt run (cloud-init, unattended-upgrades) often holds the dpkg lock:
# apt-get install waits for it (DPkg::Lock::Timeout), and apt-get update, which does not
# honour that option for its lists lock, is retried while the lock is held.
APT_LOCK_WAIT ?= 600
APT_GET := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=$(APT_LOCK_WAIT)
define install_missing
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages: $$missing"; \
	  waited=0; \
	  until out=$$($(APT_GET) update -qq 2>&1); do \
	    case "$$out" in *"Could not get lock"*) ;; *) echo "$$out" >&2; exit 1;; esac; \
	    [ $$waited -eq 0 ] && echo "waiting up to $(APT_LOCK_WAIT) s for another apt run to release its lock"; \
	    [ $$waited -ge $(APT_LOCK_WAIT) ] && { echo "$$out" >&2; exit 1; }; \
	    sleep 2; waited=$$((waited + 2)); \
	  done; \
	  $(APT_GET) install -y -qq $$missing; \
	fi
endef

system-deps:
	$(call install_missing,$(SYSTEM_PACKAGES))

test-system-deps:
	$(call install_missing,$(TEST_SYSTEM_PACKAGES))

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py fedmount/blocks/_md5mb.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip wheel
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# Building arvados-llfuse takes about a minute; the stamp makes later runs free.
arv-mount: $(ARV_MOUNT_VENV)/.installed-$(ARV_MOUNT_VERSION)

$(ARV_MOUNT_VENV)/.installed-$(ARV_MOUNT_VERSION): | test-system-deps
	$(PYTHON) -m venv $(ARV_MOUNT_VENV)
	$(ARV_MOUNT_VENV)/bin/pip install -q --upgrade pip wheel
	$(ARV_MOUNT_VENV)/bin/pip install -q 'arvados-fuse==$(ARV_MOUNT_VERSION)'
	touch $@

crunchstat-summary: $(CRUNCHSTAT_SUMMARY_VENV)/.installed-$(ARV_MOUNT_VERSION)

$(CRUNCHSTAT_SUMMARY_VENV)/.installed-$(ARV_MOUNT_VERSION):
	$(PYTHON) -m venv $(CRUNCHSTAT_SUMMARY_VENV)
	$(CRUNCHSTAT_SUMMARY_VENV)/bin/pip install -q --upgrade pip wheel
	$(CRUNCHSTAT_SUMMARY_VENV)/bin/pip install -q 'crunchstat-summary==$(ARV_MOUNT_VERSION)'
	touch $@

clean:
	rm -rf $(VENV) $(ARV_MOUNT_VENV) build *.egg-info .pytest_cache
