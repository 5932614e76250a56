#!/usr/bin/env bash
# The core VM: the IPAM server (deploy/systemd/netd-ipam.service) and the lab's pools
# for MODE (l2: a pool per rack subnet; vlan: a pool per rack VLAN; bgp: one pool of
# per-host blocks). ipam.sh MODE; the token from NETD_TOKEN (the Vagrantfile's).
. "${NETD_SRC:-/vagrant}/vagrant/provision/lib.sh"
mode="$1"
: "${NETD_TOKEN:?NETD_TOKEN: the IPAM token (the Vagrantfile passes it)}"
printf '%s\n' "$NETD_TOKEN" | put /etc/netd/ipam.token 0600
sys systemctl enable --now netd-ipam.service
netctl=(/opt/netd/bin/netctl --server http://127.0.0.1:9650 --token-file /etc/netd/ipam.token)
if [ "$DRY" != 1 ]; then
    for _ in $(seq 50); do curl -fs http://127.0.0.1:9650/healthz >/dev/null && break; sleep 0.2; done
fi
# the pools, from vagrant/lab.json: one netctl command each (printed in a dry run)
python3 - "$SRC/vagrant/lab.json" "$mode" <<'PY' | while read -r line; do
import ipaddress, json, shlex, sys
lab, mode = json.load(open(sys.argv[1])), sys.argv[2]
if mode == "bgp":
    p = lab["bgp_pool"]
    print(shlex.join(["pool", "create", p["name"], "--cidr", p["cidr"], "--mode", "bgp",
                      "--block-prefix", str(p["block_prefix"])]))
for r in lab["racks"]:
    if mode == "l2":  # .2-.49 stay for the ToR and the hosts' own addresses
        net = ipaddress.ip_network(r["subnet"])
        print(shlex.join(["pool", "create", r["name"], "--cidr", r["subnet"],
                          "--gateway", r["gateway"], "--reserve",
                          f"{net.network_address + 2}-{net.network_address + 49}"]))
    elif mode == "vlan":
        print(shlex.join(["pool", "create", f"{r['name']}-v{r['vlan']}", "--cidr",
                          r["vlan_subnet"], "--gateway", r["vlan_gateway"], "--mode", "vlan",
                          "--vlan", str(r["vlan"])]))
PY
    eval "args=($line)"
    if [ "$DRY" = 1 ]; then echo "+ netctl ${args[*]}"; else
        "${netctl[@]}" "${args[@]}" || "${netctl[@]}" pool show "${args[2]}" >/dev/null
    fi
done
