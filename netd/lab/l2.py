"""The L2 lab: one flat subnet, a "physical" switch, the gateway with the IPAM, hosts on bond0.

``netd lab up --mode l2 --hosts 2`` builds::

    PREFIX-gw  lan0 198.18.0.1/24 (the subnet's gateway) + 198.18.0.2/24, where
       |       the IPAM server listens (:9650, SQLite store and token in DIR)
    PREFIX-sw  Linux bridge PREFIX-br: the "physical" switch
       |
    PREFIX-h1  bond0 198.18.0.11/24, default via .1; agent with [l2] (br0 over bond0)
    PREFIX-h2  bond0 198.18.0.12/24, ...

and the pool ``lab`` (198.18.0.0/24, .1-.49 reserved for infrastructure): the
containers sit in the hosts' own subnet. The lab never touches the machine's
own interfaces: 198.18.0.0/24 only exists in these namespaces.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from netd.dataplane.model import Route
from netd.dataplane.netlink import Netlink

if TYPE_CHECKING:
    from netd.lab.base import HostPlan, LabPlan, Manifest

NAME = "l2"
SUBNET = ipaddress.ip_network("198.18.0.0/24")
GATEWAY = "198.18.0.1"
IPAM_ADDRESS = "198.18.0.2"
RESERVED = "198.18.0.1-198.18.0.49"
POOL = "lab"
HOST_OFFSET = 10  # host N gets .(10+N): h1 -> .11
MAX_HOSTS = 39  # .11 .. .49, all inside the reserved range
UPLINK = "bond0"
HOST_BRIDGE = "br0"
GW_LINK = "lan0"
STATIC = 4  # route protocol "static", as an operator's


def roles(prefix: str) -> dict[str, str]:
    """The lab's own infrastructure namespaces, by role."""
    return {"switch": f"{prefix}-sw", "gateway": f"{prefix}-gw"}


def ipam_role() -> str:
    return "gateway"


def host_address(index: int) -> str:
    return str(SUBNET.network_address + HOST_OFFSET + index)


def bridge_name(prefix: str) -> str:
    return f"{prefix}-br"


def pools(plan: LabPlan) -> list[dict[str, object]]:
    """The pools the lab creates (``netctl pool create`` arguments, and the status view)."""
    return [{"name": POOL, "cidr": str(SUBNET), "gateway": GATEWAY, "vlan": None,
             "args": ["--cidr", str(SUBNET), "--gateway", GATEWAY, "--mode", "l2",
                      "--reserve", RESERVED, "--label", f"lab={plan.prefix}"]}]


def host_networks() -> list[tuple[str, str]]:
    """Each host's podman networks: (name suffix, pool); one, ``PREFIX-hN`` on the pool."""
    return [("", POOL)]


def agent_table(plan: LabPlan, host: HostPlan) -> list[str]:
    """The mode's table of a host's agent.toml."""
    return ["[l2]", f'uplink = "{UPLINK}"', f'bridge = "{HOST_BRIDGE}"']


def build(plan: LabPlan, manifest: Manifest) -> None:
    """The switch bridge, the gateway's and the hosts' uplinks (namespaces exist already)."""
    r = roles(plan.prefix)
    bridge = bridge_name(plan.prefix)
    prefixlen = SUBNET.prefixlen
    with Netlink(r["switch"]) as sw:
        sw.create_bridge(bridge)
        ports = [(f"{plan.prefix}-gw", GW_LINK, r["gateway"])]
        ports += [(f"{plan.prefix}-{h.name}", UPLINK, h.netns) for h in plan.hosts]
        for port, peer, peer_ns in ports:
            sw.create_veth(port, peer, peer_netns=peer_ns, master=bridge)
    with Netlink(r["gateway"]) as gw:
        gw.set_up(GW_LINK)
        for address in (GATEWAY, IPAM_ADDRESS):
            gw.add_address(GW_LINK, f"{address}/{prefixlen}")
    for host in plan.hosts:
        with Netlink(host.netns) as nl:
            nl.set_up(UPLINK)
            nl.add_address(UPLINK, f"{host.address}/{prefixlen}")
            nl.add_route(Route("0.0.0.0/0", gateway=GATEWAY, ifname=UPLINK, proto=STATIC))
    manifest["switch"] = {"netns": r["switch"], "bridge": bridge}


__all__ = ["GATEWAY", "IPAM_ADDRESS", "MAX_HOSTS", "NAME", "POOL", "SUBNET", "UPLINK", "build",
           "roles"]
