"""A host on a switch with a gateway, in namespaces of this run (the L2 dataplane tests).

    gw  (eth0 198.18.0.1/24) --+
                               sw (Linux bridge sw0, the "physical" switch)
    host (bond0 198.18.0.11/24, default via .1) --+
        after the takeover: br0 owns bond0's MAC/address/routes, containers hang off br0

The host namespace behaves like a host where dockerd ran: iptables FORWARD
policy DROP and bridged frames passed to iptables. Every namespace is named
with this run's prefix and removed after.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from netd.dataplane import l2
from netd.dataplane.model import Route
from netd.dataplane.netlink import Netlink
from netd.dataplane.netns import create_netns, list_netns, remove_netns
from tests.conftest import require

RUN_PREFIX = f"nd{secrets.token_hex(3)}-"
GW_IP = "198.18.0.1"
HOST_IP = "198.18.0.11"
HOST_MAC = "02:00:c6:12:00:0b"
GW_MAC = "02:00:c6:12:00:01"
STATIC = 4

def _root_ok() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@contextlib.contextmanager
def namespaces_of_this_run() -> Iterator[None]:
    """Needs what a namespace lab needs; removes every namespace of this run after."""
    require(_root_ok(), "needs root and iproute2 for network namespaces")
    require(shutil.which("iptables") is not None, "needs iptables")
    require(shutil.which("ping") is not None or shutil.which("busybox") is not None,
            "needs ping (iputils-ping) or busybox")
    try:
        yield
    finally:
        for name in list_netns(RUN_PREFIX):
            remove_netns(name)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=30)


def in_ns(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *cmd, check=check)


PING = ["ping"] if shutil.which("ping") else ["busybox", "ping"]


def ping(ns: str, ip: str) -> bool:
    return in_ns(ns, *PING, "-c1", "-W1", ip, check=False).returncode == 0


@dataclass
class Lab:
    tag: str
    sw: str
    gw: str
    host: str
    made: list[str]

    def container(self, name: str) -> str:
        ns = self.tag + name
        create_netns(ns)
        self.made.append(ns)
        return ns

    def state(self) -> l2.L2State:
        return l2.read_state("bond0", "br0", netns=self.host)


_counter = iter(range(1000))


@contextlib.contextmanager
def switched_host() -> Iterator[Lab]:
    """gw and a host on a "physical" switch, the host like one where dockerd ran."""
    tag = f"{RUN_PREFIX}{next(_counter)}"
    made: list[str] = []
    try:
        names = {}
        for role in ("sw", "gw", "host"):
            names[role] = tag + role
            create_netns(names[role])
            made.append(names[role])
        sw, gw, host = names["sw"], names["gw"], names["host"]
        with Netlink(sw) as nl:
            nl.create_bridge("sw0")
            nl.create_veth("p-gw", "eth0", peer_netns=gw, peer_mac=GW_MAC, master="sw0")
            nl.create_veth("p-host", "bond0", peer_netns=host, peer_mac=HOST_MAC, master="sw0")
        with Netlink(gw) as nl:
            nl.set_up("eth0")
            nl.add_address("eth0", f"{GW_IP}/24")
        with Netlink(host) as nl:
            nl.set_up("bond0")
            nl.add_address("bond0", f"{HOST_IP}/24")
            nl.add_route(Route("0.0.0.0/0", gateway=GW_IP, ifname="bond0", proto=STATIC))
            nl.add_route(Route("198.19.0.0/16", gateway=GW_IP, ifname="bond0", proto=STATIC,
                               metric=50))
            nl.add_route(Route("198.19.64.0/18", gateway=GW_IP, ifname="bond0", proto=STATIC,
                               table=100))  # policy routing tables move too
        # like a host where dockerd ran
        in_ns(host, "iptables", "-P", "FORWARD", "DROP")
        in_ns(host, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
        yield Lab(tag, sw, gw, host, made)
    finally:
        for ns in reversed(made):
            remove_netns(ns)


def taken_over(lab: Lab) -> l2.TakeoverResult:
    return l2.takeover("bond0", "br0", netns=lab.host, arp_timeout=3)
