# make demo   - set up everything and run the namespace lab demo (as root, or with sudo)
# make test   - set up everything and run lint, types and the whole test suite (as root, or with sudo)
VENV ?= .venv
export VENV

PREFIX ?= /usr/local
INSTALL_VENV ?= /opt/hostwall
UNITDIR ?= /etc/systemd/system
CATALOGDIR ?= /usr/lib/systemd/catalog

.PHONY: setup setup-tests demo test lint unit unit-shifted netns bench mutants clean install uninstall deb \
	collection collection-sanity lab-rollout-test

setup:
	./scripts/setup.sh

# setup, plus the services the security tests run against (never part of `make install`)
setup-tests:
	./scripts/setup.sh --tests

demo: setup
	$(VENV)/bin/hostwall demo

lint: setup-tests
	$(VENV)/bin/ruff check hostwall tests ansible
	$(VENV)/bin/mypy

# The unit tests need neither root nor the services of the security tests.
unit: setup
	$(VENV)/bin/python -m pytest tests/unit

netns: setup-tests
	$(VENV)/bin/python -m pytest tests/netns

# The unit tests also run with the clock moved ahead: a date written into a test that
# will expire fails here today, not on the day it expires (tests/unit/conftest.py).
CLOCK_SHIFTS ?= 45d 400d 5y

test: lint
	$(VENV)/bin/python -m pytest
	$(MAKE) --no-print-directory unit-shifted

unit-shifted: setup-tests
	for shift in $(CLOCK_SHIFTS); do \
		HOSTWALL_TEST_CLOCK_SHIFT=$$shift $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/unit || exit 1; \
	done

# Every benchmark (root; each in namespaces of its own), one table of figures, ratios and
# targets, and bench-results.json; BENCH_ARGS=--large adds the 300k full load.
# Then the property tests with ten times the examples of the default run.
BENCH_ARGS ?=
bench: setup
	$(VENV)/bin/python tests/bench/run_all.py $(BENCH_ARGS)
	HOSTWALL_HYPOTHESIS=bench $(VENV)/bin/python -m pytest tests/unit/test_differential.py \
		tests/unit/test_bad_input.py tests/netns/test_differential_kernel.py

# Hand-written mutants of the critical paths (tests/mutants.py), each in a copy of the tree
# with the tests that must catch it; reports the survivors. Root; not part of `make test`.
MUTANTS_ARGS ?=
mutants: setup-tests
	$(VENV)/bin/python tests/mutants.py $(MUTANTS_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# Installs hostwall on this host, runtime only (no development extras, no compiler: the
# systemd binding is Debian's python3-systemd): a private virtual environment in
# $(INSTALL_VENV), the command in $(PREFIX)/bin, the unit (its ExecStart follows PREFIX),
# the journald catalog, man pages, bash/zsh/fish completions, /etc/default/hostwall, an
# empty /etc/hostwall/policies and the examples in $(PREFIX)/share/doc/hostwall.
# DESTDIR stages it elsewhere. `make uninstall` removes what it installed.
install:
	DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" INSTALL_VENV="$(INSTALL_VENV)" UNITDIR="$(UNITDIR)" \
		CATALOGDIR="$(CATALOGDIR)" SYSTEM_SYSTEMD=1 ./scripts/install.sh install

uninstall:
	PREFIX="$(PREFIX)" INSTALL_VENV="$(INSTALL_VENV)" ./scripts/install.sh uninstall

# dist/hostwall_<version>_<arch>.deb, built with debhelper (debian/); needs the packages in
# debian/control's Build-Depends (dpkg-checkbuilddeps names what is missing).
# debian/rules writes the package to dist/ and nothing to the parent directory (as
# dpkg-buildpackage would).
deb:
	dpkg-checkbuilddeps
	debian/rules clean
	debian/rules binary
	debian/rules clean

# The Vagrant lab's twin (tests/boot/twin.py): server, partner and outsider as
# systemd-nspawn machines on a network in namespaces of their own, provisioned by
# vagrant/playbook.yml over SSH. LAB_SERVERS=N: N servers (server, server2, ...);
# LAB_NAME names a second lab beside the first. lab-down also cleans up after a failure.
# lab-provision runs the playbook again, with ANSIBLE_ARGS (e.g. "--check --diff").
LAB_SERVERS ?= 1
LAB_NAME ?= hwlab
ANSIBLE_ARGS ?=
.PHONY: lab lab-check lab-provision lab-down
lab: setup
	$(VENV)/bin/python tests/boot/twin.py up --name $(LAB_NAME) --servers $(LAB_SERVERS)

lab-check:
	$(VENV)/bin/python tests/boot/twin.py check --name $(LAB_NAME)

lab-provision:
	$(VENV)/bin/python tests/boot/twin.py provision --name $(LAB_NAME) -- $(ANSIBLE_ARGS)

lab-down:
	$(VENV)/bin/python tests/boot/twin.py down --name $(LAB_NAME)

# A libvirt Vagrant box built here from Debian packages (tests/boot/vagrant_box.py) and
# added as hostwall/bookworm, the Vagrantfile's default box. vagrant-box-check boots the
# built box under QEMU's software emulation and logs in as vagrant.
.PHONY: vagrant-box vagrant-box-check
vagrant-box: setup
	$(VENV)/bin/python tests/boot/vagrant_box.py add

vagrant-box-check: setup
	$(VENV)/bin/python tests/boot/vagrant_box.py boot-check

# The Ansible collection hostwall.firewall (module, role, rolling-change playbook) as
# dist/hostwall-firewall-<version>.tar.gz; install it with
# ansible-galaxy collection install dist/hostwall-firewall-<version>.tar.gz
collection: setup-tests
	./scripts/build-collection.sh

# ansible-test sanity on the built collection, without containers (the tests that need
# none; those missing a tool, such as pwsh or shellcheck, report themselves skipped)
collection-sanity: collection
	./scripts/collection-sanity.sh

# The rolling change on a lab of three servers (tests/boot/test_lab_rollout.py): a change
# that locks the partner out stops at the first server, which reverts by itself; the other
# two keep their policy. Exit 0 only then. Brings its own lab up and down.
lab-rollout-test: setup-tests
	$(VENV)/bin/python -m pytest -p no:cacheprovider tests/boot/test_lab_rollout.py

# The Vagrant lab on libvirt with QEMU's software emulation (tests/boot/vagrant_lab.py):
# libvirtd, virtlogd and every libvirt network in a namespace of their own, then
# `vagrant up` there with the box of vagrant-box. vagrant-test: up, check and down in one go.
.PHONY: vagrant-up vagrant-check vagrant-down vagrant-test
vagrant-up: setup
	$(VENV)/bin/python tests/boot/vagrant_lab.py up

vagrant-check:
	$(VENV)/bin/python tests/boot/vagrant_lab.py check

vagrant-down:
	$(VENV)/bin/python tests/boot/vagrant_lab.py down

vagrant-test: setup
	$(VENV)/bin/python tests/boot/vagrant_lab.py test
