#!/usr/bin/env bash
# Every VM: netd from the wheel (`make wheel` on the machine running vagrant) into a
# venv at /opt/netd, and its systemd units (deploy/systemd).
. "${NETD_SRC:-/vagrant}/vagrant/provision/lib.sh"
sys apt-get update -qq
apt_install python3 python3-venv gcc libc6-dev iproute2 nftables iptables curl
wheel=$(ls "$SRC"/dist/netd-*.whl 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$wheel" ]; then
    echo "no wheel in $SRC/dist: run 'make wheel' before 'vagrant up'" >&2
    exit 1
fi
sys python3 -m venv /opt/netd
sys /opt/netd/bin/pip install -q "$wheel"
for unit in netd-ipam.service netd-agent.service; do
    put "/etc/systemd/system/$unit" < "$SRC/deploy/systemd/$unit"
done
sys systemctl daemon-reload
