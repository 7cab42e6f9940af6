# sudo make demo   - set up everything and run the namespace lab demo
# sudo make test   - set up everything and run lint, types and the whole test suite
VENV ?= .venv
export VENV

PREFIX ?= /usr/local
INSTALL_VENV ?= /opt/hostwall
UNITDIR ?= /etc/systemd/system
CATALOGDIR ?= /usr/lib/systemd/catalog

.PHONY: setup setup-tests demo test lint unit unit-shifted netns bench clean install

setup:
	./scripts/setup.sh

# setup, plus the services the security tests run against (never part of `make install`)
setup-tests:
	./scripts/setup.sh --tests

demo: setup
	$(VENV)/bin/hostwall demo

lint: setup-tests
	$(VENV)/bin/ruff check hostwall tests vagrant/library
	$(VENV)/bin/mypy

unit: setup-tests
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

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# Installs hostwall on this host: a private virtual environment, the command in
# $(PREFIX)/bin, the systemd unit, the journald catalog, /etc/hostwall (policies
# directory, with the examples beside it, not active) and /var/lib/hostwall.
install: setup
	python3 -m venv $(INSTALL_VENV)
	$(INSTALL_VENV)/bin/python -m pip install -q .
	install -d $(PREFIX)/bin
	ln -sf $(INSTALL_VENV)/bin/hostwall $(PREFIX)/bin/hostwall
	install -D -m 0644 units/hostwall.service $(UNITDIR)/hostwall.service
	install -D -m 0644 units/hostwall.catalog $(CATALOGDIR)/hostwall.catalog
	install -d -m 0755 /etc/hostwall/policies /etc/hostwall/examples
	install -m 0644 policies/*.yaml policies/*.txt policies/examples/*.yaml /etc/hostwall/examples/
	install -D -m 0644 units/sudoers.hostwall $(INSTALL_VENV)/share/sudoers.hostwall
	install -d -m 0700 /var/lib/hostwall
	-journalctl --update-catalog
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed: write policies to /etc/hostwall/policies, then: systemctl enable --now hostwall"

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
