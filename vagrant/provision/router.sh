#!/usr/bin/env bash
# A router VM: router.sh core | router.sh TOR MODE VLAN GATEWAY [VLAN_GATEWAY]
# FRR with the configuration `netd fabric config` generates from vagrant/fabric.toml
# (the namespace lab's generator, checked by vtysh -C); a ToR in the vlan mode also
# gets its rack VLAN's gateway on an 802.1q interface.
. "${NETD_SRC:-/vagrant}/vagrant/provision/lib.sh"
name="$1" mode="${2:-}" vlan="${3:-}" gateway="${4:-}" vlan_gateway="${5:-}"
apt_install frr
"$NETD" fabric config "$SRC/vagrant/fabric.toml" --out "$ROOT/etc/frr/netd"
if [ ! -f "$ROOT/etc/frr/netd/$name.conf" ]; then
    echo "router.sh: $name is not a router of vagrant/fabric.toml" >&2
    exit 1
fi
put /etc/frr/frr.conf 0640 < "$ROOT/etc/frr/netd/$name.conf"
put /etc/sysctl.d/90-netd-router.conf <<'CONF'
net.ipv4.ip_forward = 1
CONF
sys sysctl -q -p /etc/sysctl.d/90-netd-router.conf
sys sed -i 's/^bgpd=no/bgpd=yes/' /etc/frr/daemons
if [ "$mode" = vlan ] && [ -n "$vlan" ] && [ -n "$vlan_gateway" ]; then
    # the rack NIC is the one holding the rack's gateway address (the Vagrantfile's)
    if [ "$DRY" = 1 ]; then nic=eth3; else
        nic=$(ip -o -4 addr show | awk -v gw="$gateway/" 'index($4, gw) == 1 {print $2}')
    fi
    sys ip link add link "$nic" name "$nic.$vlan" type vlan id "$vlan"
    sys ip addr add "$vlan_gateway/24" dev "$nic.$vlan"
    sys ip link set "$nic.$vlan" up
fi
sys systemctl restart frr
