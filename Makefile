# netd — every target installs what it needs (Debian packages, a venv) and is
# safe to run twice. Run as root on Debian 12.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)
# Debian packages the tests, demo and benchmarks use
# (gcc builds the CNI plugin's native front; docker.io is for the Docker driver's tests;
# nftables gives the agent libnftables for the L2 port guards; containerd is the CRI
# test's runtime; systemd gives systemd-analyze, which checks deploy/systemd; vagrant
# validates vagrant/Vagrantfile; chromium runs the web view's browser tests)
APT_PACKAGES := curl iproute2 iputils-ping iptables nftables containernetworking-plugins podman \
	runc busybox-static gcc libc6-dev docker.io openvswitch-switch tcpdump iperf3 frr etcd-server \
	containerd systemd vagrant vagrant-libvirt chromium

.PHONY: help deps venv lint test test-unit demo demo-down bench clean podman-setup wheel

help:
	@echo "make demo   a two-host lab (MODE=l2|vlan|bgp) in namespaces, four podman containers: matrix + IPAM table"
	@echo "make test   install everything, lint (ruff, mypy), run the whole test suite"
	@echo "make bench  run the benchmarks (tests/bench) and print the figures"

deps:
	@scripts/install-deps $(APT_PACKAGES)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "netd needs Python >= 3.11"'
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || scripts/install-deps python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

# podman 4.3 + CNI backend + runc + busybox-static, configured for this kernel
# (drop-in /etc/containers/containers.conf.d/50-netd.conf; see tests/support/podman.py)
podman-setup: venv
	$(BIN)/python -m tests.support.podman setup

lint: venv
	$(BIN)/ruff check netd cni bgp ovs tests
	$(BIN)/mypy

test: deps venv lint
	$(BIN)/pytest -q -p no:cacheprovider tests --ignore=tests/bench

test-unit: venv
	$(BIN)/pytest -q tests/unit

demo: deps venv
	@scripts/demo $(if $(MODE),--mode $(MODE))

demo-down:
	@scripts/demo down

bench: deps venv
	$(BIN)/python -m tests.bench.ipam_bench
	$(BIN)/python -m tests.bench.cni_bench
	$(BIN)/python -m tests.bench.docker_bench
	$(BIN)/python -m tests.bench.vlan_bench
	$(BIN)/python -m tests.bench.bgp_bench
	$(BIN)/python -m tests.bench.etcd_bench
	$(BIN)/python -m tests.bench.ui_bench

# dist/netd-VERSION-py3-none-any.whl and dist/netd-VERSION.tar.gz (README "Install")
wheel: venv
	$(BIN)/python -m build --sdist --wheel --outdir dist

clean: demo-down
	rm -rf $(VENV) .demo .bench *.egg-info dist build
