#!/usr/bin/env bash
# A host VM: host.sh MODE NAME ADDRESS GATEWAY RACK IPAM
# bond0 from its two rack NICs (real bonding here, a veth in the namespace lab), the
# agent's config for MODE, the CNI plugins and conflist, and the agent (systemd).
. "${NETD_SRC:-/vagrant}/vagrant/provision/lib.sh"
mode="$1" name="$2" address="$3" gateway="$4" rack="$5" ipam="$6"
: "${NETD_TOKEN:?NETD_TOKEN: the IPAM token (the Vagrantfile passes it)}"
lab="$SRC/vagrant/lab.json"
pool=$(python3 -c 'import json, sys
lab = json.load(open(sys.argv[1])); mode, rack = sys.argv[2], sys.argv[3]
r = next(r for r in lab["racks"] if r["name"] == rack)
print({"l2": rack, "vlan": rack + "-v" + str(r["vlan"]), "bgp": lab["bgp_pool"]["name"]}[mode])' \
    "$lab" "$mode" "$rack")

# bond0: the NICs with no address that are not the first (vagrant's) one
if [ "$DRY" = 1 ]; then nics="eth2 eth3"; else
    nics=$(ip -o link show | awk -F': ' '$2 != "lo" {print $2}' | tail -n +2 | while read -r n; do
        ip -o -4 addr show dev "$n" | grep -q inet || echo "$n"; done | head -2 | xargs)
fi
sys ip link add bond0 type bond mode active-backup miimon 100
for n in $nics; do
    sys ip link set "$n" down
    sys ip link set "$n" master bond0
done
sys ip link set bond0 up
sys ip addr add "$address/24" dev bond0

printf '%s\n' "$NETD_TOKEN" | put /etc/netd/ipam.token 0600
{
    cat <<CONF
# written by vagrant/provision/host.sh ($mode)
mode = "$mode"
host = "$name"
ipam_url = "http://$ipam:9650"
token_file = "/etc/netd/ipam.token"
CONF
    case "$mode" in
        l2) printf '[l2]\nuplink = "bond0"\nbridge = "br0"\n' ;;
        vlan) printf '[vlan]\nuplink = "bond0"\nbridge = "ovs0"\ndatapath_type = "system"\n' ;;
        bgp) printf '[bgp]\nasn = 64512\nrouter_id = "%s"\npeers = [{ address = "%s", asn = 65001 }]\n' \
                 "$address" "$gateway" ;;
    esac
} | put /etc/netd/agent.toml 0600
if [ "$mode" = vlan ]; then apt_install openvswitch-switch; fi
if [ "$mode" = bgp ]; then sys "$NETD" agent --config /etc/netd/agent.toml --plan; fi
if [ "$DRY" = 1 ]; then
    "$NETD" install-cni --bin-dir "$ROOT/opt/cni/bin" --conf-dir "$ROOT/etc/cni/net.d" \
        --pool "$pool"
else
    apt_install containernetworking-plugins podman
    "$NETD" install-cni --conf-dir /etc/cni/net.d --pool "$pool"
fi
sys systemctl enable --now netd-agent.service
