"""The VLAN lab: hosts trunked into a tag-transparent switch, a router with a leg per VLAN.

``netd lab up --mode vlan --hosts 2`` builds::

    PREFIX-gw  lan0 198.18.0.1/24 (the hosts' gateway) + .2 (the IPAM, :9650);
       |       routes to the VLAN subnets via the router (198.18.0.3)
    PREFIX-rt  the router: its own OVS (netdev) bridge rtr0 on a trunk into the
       |       switch, internal ports v100 198.18.100.1/24 (tag 100) and v200
       |       198.18.200.1/24 (tag 200), rtr0 198.18.0.3/24 untagged; forwarding on
    PREFIX-sw  Linux bridge PREFIX-br: the "physical" switch; it forwards 802.1Q
       |       frames as they are (no VLAN filtering)
    PREFIX-h1  bond0 198.18.0.11/24, default via .1; its own ovsdb-server and
    PREFIX-h2  ovs-vswitchd (netdev datapath, userspace TSO on); agent with [vlan]
               (ovs0 over bond0)

and the pools ``vlan100`` (198.18.100.0/24, VLAN 100) and ``vlan200``
(198.18.200.0/24, VLAN 200), with a podman network per host and pool
(``PREFIX-h1-v100``...). Containers of one VLAN meet at layer 2 across hosts;
between VLANs only through the router. The hosts' own traffic is untagged.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from netd.dataplane.ethtool import set_tx_checksum
from netd.dataplane.model import Route
from netd.dataplane.netlink import Netlink
from netd.dataplane.uplink import write_sysctl
from netd.lab.ovs import OvsInstance
from netd.ovs.ovsdb import Ovsdb

if TYPE_CHECKING:
    from netd.lab.base import HostPlan, LabPlan, Manifest

NAME = "vlan"
HOSTS_SUBNET = ipaddress.ip_network("198.18.0.0/24")  # the hosts' own, untagged
HOSTS_GATEWAY = "198.18.0.1"
IPAM_ADDRESS = "198.18.0.2"
ROUTER_ADDRESS = "198.18.0.3"
HOST_OFFSET = 10
MAX_HOSTS = 39
UPLINK = "bond0"
HOST_BRIDGE = "ovs0"
ROUTER_BRIDGE = "rtr0"
GW_LINK = "lan0"
TRUNK = "trunk0"
STATIC = 4
#: (pool, VLAN, subnet): the pools the lab makes, one podman network per host each
VLANS = (("vlan100", 100, ipaddress.ip_network("198.18.100.0/24")),
         ("vlan200", 200, ipaddress.ip_network("198.18.200.0/24")))
POOL, _, SUBNET = VLANS[0]
GATEWAY = str(SUBNET.network_address + 1)  # the first pool's gateway (on the router)


def gateway_of(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return str(subnet.network_address + 1)


def roles(prefix: str) -> dict[str, str]:
    return {"switch": f"{prefix}-sw", "gateway": f"{prefix}-gw", "router": f"{prefix}-rt"}


def ipam_role() -> str:
    return "gateway"


def host_address(index: int) -> str:
    return str(HOSTS_SUBNET.network_address + HOST_OFFSET + index)


def bridge_name(prefix: str) -> str:
    return f"{prefix}-br"


def ovs_dir(plan: LabPlan, host: HostPlan) -> str:
    return str(host.dir / "ovs")


def pools(plan: LabPlan) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for name, vlan, subnet in VLANS:
        gw = gateway_of(subnet)
        first, last = subnet.network_address + 1, subnet.network_address + 9
        out.append({"name": name, "cidr": str(subnet), "gateway": gw, "vlan": vlan,
                    "args": ["--cidr", str(subnet), "--gateway", gw, "--vlan", str(vlan),
                             "--mode", "vlan", "--reserve", f"{first}-{last}",
                             "--label", f"lab={plan.prefix}"]})
    return out


def host_networks() -> list[tuple[str, str]]:
    """Each host's podman networks: ``PREFIX-hN-v100`` on vlan100, ``...-v200``."""
    return [(f"-v{vlan}", name) for name, vlan, _ in VLANS]


def agent_table(plan: LabPlan, host: HostPlan) -> list[str]:
    d = ovs_dir(plan, host)
    return ["[vlan]", f'uplink = "{UPLINK}"', f'bridge = "{HOST_BRIDGE}"',
            f"trunks = [{', '.join(str(v) for _, v, _ in VLANS)}]",
            'datapath_type = "netdev"  # no openvswitch kernel module here',
            "userspace_tso = true  # the lab's ovs-vswitchd starts with userspace-tso-enable",
            f'ovsdb = "unix:{d}/db.sock"', f'rundir = "{d}"']


def build(plan: LabPlan, manifest: Manifest) -> None:
    """Switch, gateway, router (with its OVS) and the hosts' uplinks and OVS daemons."""
    r = roles(plan.prefix)
    bridge = bridge_name(plan.prefix)
    plen = HOSTS_SUBNET.prefixlen
    with Netlink(r["switch"]) as sw:
        sw.create_bridge(bridge)
        ports = [(f"{plan.prefix}-gw", GW_LINK, r["gateway"]),
                 (f"{plan.prefix}-rt", TRUNK, r["router"])]
        ports += [(f"{plan.prefix}-{h.name}", UPLINK, h.netns) for h in plan.hosts]
        for port, peer, peer_ns in ports:
            sw.create_veth(port, peer, peer_netns=peer_ns, master=bridge)
    with Netlink(r["gateway"]) as gw:
        gw.set_up(GW_LINK)
        for address in (HOSTS_GATEWAY, IPAM_ADDRESS):
            gw.add_address(GW_LINK, f"{address}/{plen}")
        for _, _, subnet in VLANS:
            gw.add_route(Route(str(subnet), gateway=ROUTER_ADDRESS, ifname=GW_LINK,
                               proto=STATIC))
    write_sysctl("net.ipv4.ip_forward", "1", r["gateway"])  # the hosts reach the VLANs
    # the lab's "physical" NICs write their checksums (a veth leaves them to the
    # receiver, which a userspace datapath is not: TCP into OVS would fail)
    set_tx_checksum(GW_LINK, False, r["gateway"])
    manifest["ovs"] = {}
    _router(plan, manifest, r["router"])
    for host in plan.hosts:
        with Netlink(host.netns) as nl:
            nl.set_up(UPLINK)
            nl.add_address(UPLINK, f"{host.address}/{plen}")
            nl.add_route(Route("0.0.0.0/0", gateway=HOSTS_GATEWAY, ifname=UPLINK,
                               proto=STATIC))
        ovs = OvsInstance(host.netns, host.dir / "ovs", userspace_tso=True)
        manifest["ovs"][host.name] = {"netns": host.netns, "dir": str(ovs.dir),
                                      "processes": {}}
        manifest["ovs"][host.name]["processes"] = ovs.start()
    manifest["switch"] = {"netns": r["switch"], "bridge": bridge}


def _router(plan: LabPlan, manifest: Manifest, netns: str) -> None:
    """The router: its own OVS bridge on the trunk, one internal port per VLAN."""
    ovs = OvsInstance(netns, plan.dir / "ovs-router")
    manifest["ovs"]["router"] = {"netns": netns, "dir": str(ovs.dir), "processes": {}}
    manifest["ovs"]["router"]["processes"] = ovs.start()
    db = Ovsdb(ovs.url)
    try:
        api = db.api
        with api.transaction(check_error=True) as txn:
            txn.add(api.add_br(ROUTER_BRIDGE, datapath_type="netdev"))  # standalone: NORMAL
            txn.add(api.add_port(ROUTER_BRIDGE, TRUNK))
            txn.add(api.db_set("Port", ROUTER_BRIDGE, ("trunks", [0])))
            for _, vlan, _ in VLANS:
                txn.add(api.add_port(ROUTER_BRIDGE, f"v{vlan}"))
                txn.add(api.db_set("Interface", f"v{vlan}", ("type", "internal")))
                txn.add(api.db_set("Port", f"v{vlan}", ("tag", vlan)))
    finally:
        db.close()
    with Netlink(netns) as nl:
        nl.set_up(TRUNK)
        nl.set_up(ROUTER_BRIDGE)
        nl.add_address(ROUTER_BRIDGE, f"{ROUTER_ADDRESS}/{HOSTS_SUBNET.prefixlen}")
        for _, vlan, subnet in VLANS:
            nl.set_up(f"v{vlan}")
            nl.add_address(f"v{vlan}", f"{gateway_of(subnet)}/{subnet.prefixlen}")
    for dev in (ROUTER_BRIDGE, *(f"v{vlan}" for _, vlan, _ in VLANS)):  # taps of a
        set_tx_checksum(dev, False, netns)  # userspace datapath: checksums by the kernel
    write_sysctl("net.ipv4.ip_forward", "1", netns)


__all__ = ["GATEWAY", "IPAM_ADDRESS", "MAX_HOSTS", "NAME", "POOL", "SUBNET", "UPLINK", "VLANS",
           "build", "roles"]
