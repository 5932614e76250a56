"""The BGP lab: racks of hosts under FRR ToRs, an FRR core, the IPAM behind the core.

``netd lab up --mode bgp --racks 2 --hosts-per-rack 2 [--dual-homed]`` builds::

    PREFIX-gw     lan0 198.18.0.2/24 (the IPAM, :9650), default via the core
       |
    PREFIX-core   svc0 198.18.0.1/24; one /31 per ToR (10.254.R.2k/31); FRR zebra +
       |          bgpd (AS 65000) from ``netd fabric config``'s core configuration
    PREFIX-tor-rR  up0 (the /31's odd end), rack0 198.18.R.1/24 (.2 for the second ToR
       |          of a dual-homed rack); FRR (AS 65001): the rack's hosts by listen range
    PREFIX-sw-rR  a Linux bridge: the rack's layer 2 (ToRs and hosts' bond0)
       |
    PREFIX-hN     bond0 198.18.R.(10+i)/24, a static route to the IPAM's subnet via the
                  ToR (the management path); the agent in bgp mode (exabgp, AS 64512)
                  peers with its ToR(s) and gets its default from them

and the pool ``bgp`` (10.65.0.0/16, a /26 block per host), a podman network per
host. Every FRR file is what ``netd fabric config`` writes for this layout.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netd.bgp.fabric import Fabric, Rack, Tor, configs
from netd.dataplane.model import Route
from netd.dataplane.netlink import Netlink
from netd.dataplane.uplink import write_sysctl
from netd.lab.procs import alive, start_process

if TYPE_CHECKING:
    from netd.lab.base import HostPlan, LabPlan, Manifest

NAME = "bgp"
RACKS = True  # the lab's hosts are planned in racks (--racks, --hosts-per-rack)
SUBNET = ipaddress.ip_network("10.65.0.0/16")  # the pool
BLOCK_PREFIX = 26
POOL = "bgp"
CONTAINER_GATEWAY = "169.254.1.1"  # what every container has as its gateway (proxy ARP)
SERVICES = ipaddress.ip_network("198.18.0.0/24")
CORE_SERVICES = "198.18.0.1"
IPAM_ADDRESS = "198.18.0.2"
GATEWAY = IPAM_ADDRESS  # what `netd lab status` pings as "gw": behind the core, via the fabric
HOST_ASN, TOR_ASN, CORE_ASN = 64512, 65001, 65000
HOST_OFFSET = 10
MAX_RACKS, MAX_PER_RACK = 9, 20
MAX_HOSTS = MAX_RACKS * MAX_PER_RACK
UPLINK = "bond0"
STATIC = 4
FRR_LIB = Path("/usr/lib/frr")
FRR_BASE = Path("/run/netd-frr")  # FRR runs as its own user: its files outside the lab dir
RESTART_TIME = 30  # the lab's graceful restart time (the tests wait for it)


def roles(prefix: str) -> dict[str, str]:
    return {"core": f"{prefix}-core", "gateway": f"{prefix}-gw"}


def ipam_role() -> str:
    return "gateway"


def rack_of(index: int, per_rack: int) -> tuple[int, int]:
    """Host ``index`` (1-based) -> (rack number, position in the rack), both 1-based."""
    return (index - 1) // per_rack + 1, (index - 1) % per_rack + 1


def host_address_in(rack: int, position: int) -> str:
    return f"198.18.{rack}.{HOST_OFFSET + position}"


def host_address(index: int) -> str:  # without racks: rack 1
    return host_address_in(1, index)


def tor_names(rack: int, dual: bool) -> list[str]:
    return [f"tor-r{rack}a", f"tor-r{rack}b"] if dual else [f"tor-r{rack}"]


def rack_roles(plan: LabPlan) -> dict[str, str]:
    """The racks' namespaces: a switch and one or two ToRs per rack."""
    out = {}
    for r in range(1, plan.racks + 1):
        out[f"sw-r{r}"] = f"{plan.prefix}-sw-r{r}"
        for name in tor_names(r, plan.dual_homed):
            out[name] = f"{plan.prefix}-{name}"
    return out


def tor_address(rack: int, k: int) -> str:
    return f"198.18.{rack}.{1 + k}"


def fabric(plan: LabPlan) -> Fabric:
    racks = []
    for r in range(1, plan.racks + 1):
        tors = tuple(Tor(name, f"10.255.{r}.{k + 1}", f"10.254.{r}.{2 * k}",
                         f"10.254.{r}.{2 * k + 1}")
                     for k, name in enumerate(tor_names(r, plan.dual_homed)))
        racks.append(Rack(f"r{r}", ipaddress.IPv4Network(f"198.18.{r}.0/24"), tors))
    return Fabric(HOST_ASN, TOR_ASN, CORE_ASN, "10.255.0.1", BLOCK_PREFIX, RESTART_TIME,
                  tuple(racks))


def pools(plan: LabPlan) -> list[dict[str, object]]:
    return [{"name": POOL, "cidr": str(SUBNET), "gateway": None, "vlan": None,
             "args": ["--cidr", str(SUBNET), "--mode", "bgp", "--block-prefix",
                      str(BLOCK_PREFIX), "--label", f"lab={plan.prefix}"]}]


def host_networks() -> list[tuple[str, str]]:
    return [("", POOL)]


def _rack_no(host: HostPlan) -> int:
    return int(str(host.rack).removeprefix("r"))


def agent_table(plan: LabPlan, host: HostPlan) -> list[str]:
    r = _rack_no(host)
    peers = ", ".join(f'{{ address = "{tor_address(r, k)}", asn = {TOR_ASN} }}'
                      for k in range(len(tor_names(r, plan.dual_homed))))
    return ["[bgp]", f"asn = {HOST_ASN}", f'router_id = "{host.address}"',
            f'local_address = "{host.address}"', f"restart_time = {RESTART_TIME}",
            f'rundir = "{host.dir / "bgp"}"', f"peers = [{peers}]"]


# --- build ---------------------------------------------------------------------------------


def frr_dir(plan: LabPlan, node: str) -> Path:
    return FRR_BASE / plan.prefix / node


def build(plan: LabPlan, manifest: Manifest) -> None:
    """Links and addresses, then FRR on the core and every ToR, then wait for the fabric."""
    pre = plan.prefix
    core, gw = f"{pre}-core", f"{pre}-gw"
    with Netlink(core) as nl:
        nl.create_veth("svc0", "lan0", peer_netns=gw)
        nl.set_up("svc0")
        nl.add_address("svc0", f"{CORE_SERVICES}/{SERVICES.prefixlen}")
    with Netlink(gw) as nl:
        nl.set_up("lan0")
        nl.add_address("lan0", f"{IPAM_ADDRESS}/{SERVICES.prefixlen}")
        nl.add_route(Route("0.0.0.0/0", gateway=CORE_SERVICES, ifname="lan0", proto=STATIC))
    write_sysctl("net.ipv4.ip_forward", "1", core)
    f = fabric(plan)
    for rack in f.racks:
        r = int(rack.name.removeprefix("r"))
        sw = f"{pre}-sw-r{r}"
        with Netlink(sw) as nl:
            nl.create_bridge("br")
            for k, tor in enumerate(rack.tors):
                tor_ns = f"{pre}-{tor.name}"
                nl.create_veth(f"t{k}", "rack0", peer_netns=tor_ns, master="br")
                with Netlink(core) as c:
                    c.create_veth(f"r{r}{k}", "up0", peer_netns=tor_ns)
                    c.set_up(f"r{r}{k}")
                    c.add_address(f"r{r}{k}", f"{tor.core_address}/31")
                with Netlink(tor_ns) as t:
                    t.set_up("rack0")
                    t.add_address("rack0", f"{tor_address(r, k)}/24")
                    t.set_up("up0")
                    t.add_address("up0", f"{tor.address}/31")
                write_sysctl("net.ipv4.ip_forward", "1", tor_ns)
            for host in (h for h in plan.hosts if h.rack == rack.name):
                nl.create_veth(f"{host.name}", UPLINK, peer_netns=host.netns, master="br")
    for host in plan.hosts:
        r = _rack_no(host)
        with Netlink(host.netns) as nl:
            nl.set_up(UPLINK)
            nl.add_address(UPLINK, f"{host.address}/24")
            nl.add_route(Route(str(SERVICES), gateway=tor_address(r, 0), ifname=UPLINK,
                               proto=STATIC))  # the management path to the IPAM
    manifest["frr"] = {}
    files = configs(f)
    nodes = [("core", core)] + [(t.name, f"{pre}-{t.name}") for rk in f.racks for t in rk.tors]
    for node, netns in nodes:
        manifest["frr"][node] = {"netns": netns, "dir": str(frr_dir(plan, node)),
                                 "processes": {}}
        manifest["frr"][node]["processes"] = start_frr(plan, node, netns,
                                                       files[f"{node}.conf"])
    _wait_fabric(plan, f)


def start_frr(plan: LabPlan, node: str, netns: str, bgpd_conf: str) -> dict[str, Any]:
    """zebra and bgpd of one router, as the frr user, files in :func:`frr_dir`."""
    d = frr_dir(plan, node)
    d.mkdir(parents=True, exist_ok=True)
    FRR_BASE.chmod(0o755)
    (FRR_BASE / plan.prefix).chmod(0o755)
    (d / "zebra.conf").write_text(f"hostname {node}\n")
    (d / "bgpd.conf").write_text(bgpd_conf)
    user = pwd.getpwnam("frr")
    for p in (d, d / "zebra.conf", d / "bgpd.conf"):
        os.chown(p, user.pw_uid, user.pw_gid)
    d.chmod(0o750)
    common = ["-P", "0", "-z", str(d / "zserv.api"), "--vty_socket", str(d)]
    zebra = start_process(netns, [str(FRR_LIB / "zebra"), "-f", str(d / "zebra.conf"),
                                  "-i", str(d / "zebra.pid"), *common], d.parent /
                          f"{node}-zebra.log")
    _wait_file(d / "zserv.api", zebra["pid"], "zebra")
    bgpd = start_process(netns, [str(FRR_LIB / "bgpd"), "-f", str(d / "bgpd.conf"),
                                 "-i", str(d / "bgpd.pid"), *common], d.parent /
                         f"{node}-bgpd.log")
    _wait_file(d / "bgpd.vty", bgpd["pid"], "bgpd")
    return {"zebra": zebra, "bgpd": bgpd}


def _wait_file(path: Path, pid: int, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not alive(pid):
            raise RuntimeError(f"{what} exited (see {path.parent.parent})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {timeout:g} s")
        time.sleep(0.05)


def _wait_fabric(plan: LabPlan, f: Fabric, timeout: float = 60.0) -> None:
    """Until the core routes to every rack's host subnet (the ToRs' sessions are up)."""
    want = {str(r.hosts) for r in f.racks}
    deadline = time.monotonic() + timeout
    while True:
        with Netlink(f"{plan.prefix}-core") as nl:
            have = {r.dst for r in nl.routes()}
        if want <= have:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the core learnt {sorted(have & want)} of {sorted(want)} "
                               f"within {timeout:g} s (FRR logs in {FRR_BASE / plan.prefix})")
        time.sleep(0.2)


def remove_frr_files(prefix: str) -> list[str]:
    d = FRR_BASE / prefix
    if d.exists():
        shutil.rmtree(d, ignore_errors=True)
        return [f"FRR files {d}"]
    return []


__all__ = ["GATEWAY", "IPAM_ADDRESS", "MAX_HOSTS", "NAME", "POOL", "SUBNET", "UPLINK",
           "agent_table", "build", "fabric", "pools", "rack_roles", "roles"]
