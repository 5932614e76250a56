"""Docker's libnetwork remote driver, network and IPAM, on the agent's endpoint pipeline.

:class:`DockerDriver` answers every call of the remote plugin protocol
(``Plugin.Activate``, ``NetworkDriver.*``, ``IpamDriver.*``; field names as in
libnetwork's ``drivers/remote/api`` and ``ipams/remote/api``); the HTTP side is
:mod:`.docker_server`. Endpoints go through the same pipeline as CNI
(:class:`~netd.agent.service.Agent`: owner locks, the record written first, the
duplicate-address probe, release-or-queue, reconciliation), so the driver
works in every mode the agent runs; what is Docker's alone lives here.

Who owns an address. libnetwork asks the IPAM driver for an address
(``RequestAddress``) *before* it creates the endpoint, and neither call names
the container. So:

1. ``RequestAddress`` allocates in the IPAM for a provisional owner
   ``docker-pending-<mac>`` (``RequiresMACAddress`` makes Docker send the
   endpoint's MAC, random or ``--mac-address``; the IPAM records it), host =
   this agent, label ``netd.plugin=docker``. Same MAC, same answer.
2. ``CreateEndpoint`` is the agent's ADD for the owner (EndpointID, ``eth0``):
   it takes the address over from the provisional owner, makes the veth with
   the container end left in the host's namespace for Docker to move
   (*handover*), probes the wire for the address from it, and records it.
3. ``Join`` hands Docker that end, with the gateway and routes the mode's
   driver configured. After ``Join`` a background thread announces the
   container (gratuitous ARP) and reads the endpoint's name (= the container's)
   from dockerd's API (``docker_host``) to label the address with it.

In a routed mode (BGP: :attr:`~netd.dataplane.driver.Driver.routed`) the
address is handed out as a /32, ``Join`` gives the link-local gateway with a
connected route to it first (what Calico's libnetwork plugin answers), and
nothing is announced (no shared segment; the host end answers by proxy ARP).

``DeleteEndpoint`` is the agent's DEL; ``ReleaseAddress`` releases only what
is still provisional (an endpoint that was never created), so a late call can
never free an address that meanwhile went to someone else.

Fixed addresses: ``--ip`` arrives as the preferred address. When the IPAM
holds it reserved for a handle, the address goes to the container only when
dockerd has a container of that name asking for that address.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from netd.agent.errors import DuplicateAddress, InterfaceInUse
from netd.agent.service import PLUGIN_LABEL, Agent, EndpointRequest
from netd.agent.state import Attachment, DockerAddress, DockerNetwork
from netd.dataplane.model import normalize_mac
from netd.errors import AddressInUse, NetdError, Unavailable
from netd.ipam.client import all_addresses

from .docker_announce import announce_when_up

log = logging.getLogger("netd.cni.docker")

PLUGIN = "docker"
ADDRESS_SPACE = "netd"
IFNAME = "eth0"  # the interface name every Docker address carries in the IPAM
PENDING = "docker-pending-"
MAC_OPTION = "com.docker.network.endpoint.macaddress"
ADDRESS_TYPE = "RequestAddressType"
GATEWAY_TYPE = "com.docker.network.gateway"
GATEWAY_DATA = "com.docker.network.gateway"
POOL_OPTION = "pool"
ROUTE_NEXTHOP = 0  # libnetwork types.NEXTHOP
ROUTE_CONNECTED = 1  # libnetwork types.CONNECTED: on the link, no next hop
NAME_TIMEOUT = 30.0


class PluginError(Exception):
    """An answer ``{"Err": message}`` with an HTTP status (Docker shows the message)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message = message if message.startswith("netd: ") else f"netd: {message}"
        self.status = status


class Dockerd(Protocol):
    """What the driver asks dockerd (:class:`.docker_api.DockerApi`); tests pass a fake."""

    def network(self, network_id: str) -> dict[str, Any] | None: ...
    def networks(self, driver: str) -> list[dict[str, Any]] | None: ...
    def endpoint_name(self, network_id: str, endpoint_id: str) -> str | None: ...
    def container_asks_for(self, name: str, ip: str) -> bool: ...


Announce = Callable[[str, int, str, str, threading.Event], bool]


def _netd_error(exc: NetdError) -> PluginError:
    if isinstance(exc, Unavailable):
        return PluginError(f"the IPAM is unreachable, try again: {exc.message}", 503)
    return PluginError(exc.message, 400 if exc.status < 500 else 500)


def _ip_of(address: str) -> str:
    return address.split("/", 1)[0]


class DockerDriver:
    """The network and IPAM driver ``netd`` for one host. Starts nothing by itself."""

    def __init__(self, agent: Agent, *, docker: Dockerd | None = None,
                 announce: Announce | None = None) -> None:
        self.agent = agent
        self.ipam = agent.ipam
        self.state = agent.state
        self.host = agent.cfg.host
        self.docker = docker
        self.announce: Announce = announce or (
            lambda sandbox, pid, mac, ip, stop: announce_when_up(sandbox, pid, mac, ip,
                                                                 stop=stop))
        self.name_timeout = NAME_TIMEOUT
        self._guard = threading.Lock()
        self._watchers: dict[str, threading.Event] = {}
        self._threads: list[threading.Thread] = []
        self._pools: dict[str, dict[str, Any]] = {}  # last answers of get_pool
        # pools handed to a RequestPool without --subnet (see _refused_by_host_routes)
        self._handed: dict[str, float] = {}
        self.calls = {
            "Plugin.Activate": self.activate,
            "NetworkDriver.GetCapabilities": self.net_capabilities,
            "NetworkDriver.CreateNetwork": self.create_network,
            "NetworkDriver.DeleteNetwork": self.delete_network,
            "NetworkDriver.CreateEndpoint": self.create_endpoint,
            "NetworkDriver.EndpointOperInfo": self.endpoint_info,
            "NetworkDriver.DeleteEndpoint": self.delete_endpoint,
            "NetworkDriver.Join": self.join,
            "NetworkDriver.Leave": self.leave,
            "NetworkDriver.DiscoverNew": self.nothing,
            "NetworkDriver.DiscoverDelete": self.nothing,
            "NetworkDriver.ProgramExternalConnectivity": self.nothing,
            "NetworkDriver.RevokeExternalConnectivity": self.nothing,
            "IpamDriver.GetCapabilities": self.ipam_capabilities,
            "IpamDriver.GetDefaultAddressSpaces": self.address_spaces,
            "IpamDriver.RequestPool": self.request_pool,
            "IpamDriver.ReleasePool": self.release_pool,
            "IpamDriver.RequestAddress": self.request_address,
            "IpamDriver.ReleaseAddress": self.release_address,
        }

    # --- entry point ------------------------------------------------------------------

    def call(self, method: str, request: dict[str, Any], peer_pid: int = 0) -> dict[str, Any]:
        """Answer one call; raises :class:`PluginError` (never anything else)."""
        handler = self.calls.get(method)
        if handler is None:
            raise PluginError(f"unknown call {method!r}", 404)
        try:
            return handler(request, peer_pid)
        except PluginError:
            raise
        except NetdError as exc:
            raise _netd_error(exc) from exc
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PluginError(f"malformed {method} request: {exc!r}", 400) from exc
        except Exception as exc:
            log.exception("docker: internal error serving %s", method)
            raise PluginError(f"internal error in {method}: {exc}") from exc

    # --- handshake ----------------------------------------------------------------------

    def activate(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        return {"Implements": ["NetworkDriver", "IpamDriver"]}

    def net_capabilities(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        return {"Scope": "local", "ConnectivityScope": "local"}

    def ipam_capabilities(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        # the IPAM is persistent: no replay of requests after a dockerd restart
        return {"RequiresMACAddress": True, "RequiresRequestReplay": False}

    def address_spaces(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        return {"LocalDefaultAddressSpace": ADDRESS_SPACE,
                "GlobalDefaultAddressSpace": ADDRESS_SPACE}

    def nothing(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        return {}

    # --- pools ----------------------------------------------------------------------------

    def _pool(self, name: str) -> dict[str, Any]:
        """The pool's document; the last one seen when the IPAM is unreachable."""
        try:
            pool = self.ipam.get_pool(name)
        except Unavailable:
            if name in self._pools:
                return self._pools[name]
            raise
        self._pools[name] = pool
        return pool

    @staticmethod
    def _prefix(pool: dict[str, Any]) -> int:
        return ipaddress.ip_network(pool["cidr"]).prefixlen

    def request_pool(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        subnet = str(req.get("Pool") or "")
        sub_pool = str(req.get("SubPool") or "")
        options = dict(req.get("Options") or {})
        name = options.pop(POOL_OPTION, None)
        if options:
            raise PluginError(f"unknown --ipam-opt {', '.join(sorted(options))} (netd knows: "
                              f"{POOL_OPTION}=NAME)", 400)
        if req.get("V6"):
            raise PluginError("IPv6 networks are not available through the Docker driver yet",
                              400)
        pools = self.ipam.list_pools()["pools"]
        net = None
        if subnet:
            try:
                net = ipaddress.ip_network(subnet, strict=False)
            except ValueError:
                raise PluginError(f"invalid subnet {subnet!r}", 400) from None
        if name:
            pool = next((p for p in pools if p["name"] == name), None)
            if pool is None:
                raise PluginError(f"pool {name!r} does not exist ('netctl pool list' shows "
                                  "the pools)", 404)
            if net is not None and str(net) != pool["cidr"]:
                raise PluginError(f"--subnet {subnet} is not the subnet of pool {name!r} "
                                  f"({pool['cidr']})", 400)
        elif net is not None:
            pool = next((p for p in pools if p["cidr"] == str(net)), None)
            if pool is None:
                clash = [p for p in pools if net.overlaps(ipaddress.ip_network(p["cidr"]))]
                if clash:
                    p = clash[0]
                    raise PluginError(
                        f"subnet {net} overlaps pool {p['name']!r} ({p['cidr']}): use "
                        f"--subnet {p['cidr']} or --ipam-opt pool={p['name']}", 409)
                raise PluginError(f"no pool has subnet {net}: create one ('netctl pool create "
                                  f"NAME --cidr {net}') or choose one with --ipam-opt pool=NAME",
                                  404)
        else:
            raise PluginError("choose the address pool: --ipam-opt pool=NAME (or --subnet "
                              "with the subnet of a pool)", 400)
        if ":" in pool["cidr"]:
            raise PluginError(f"pool {pool['name']!r} is IPv6; the Docker driver serves IPv4 "
                              "pools only", 400)
        if sub_pool and sub_pool != pool["cidr"]:
            raise PluginError(f"--ip-range is not supported: netd allocates from the whole of "
                              f"pool {pool['name']!r}", 400)
        if not pool.get("gateway"):
            raise PluginError(f"pool {pool['name']!r} has no gateway; a Docker network needs "
                              "one", 400)
        if net is None:
            self._refused_by_host_routes(pool)
        self._pools[pool["name"]] = pool
        return {"PoolID": pool["name"], "Pool": pool["cidr"],
                "Data": {GATEWAY_DATA: f"{pool['gateway']}/{self._prefix(pool)}"}}

    def _refused_by_host_routes(self, pool: dict[str, Any]) -> None:
        """Break dockerd's loop over a pool on a subnet the host routes.

        When a network names no subnet, libnetwork checks the pool it got
        against the host's routes and, on overlap, holds it and asks again,
        until the IPAM driver offers another pool: forever with this driver,
        whose answer for a pool never changes. In L2 mode a pool is the hosts'
        own subnet, so it always overlaps. The same question again before the
        network was created is that loop: refused, with the fix (name the
        subnet, which skips libnetwork's check).
        """
        name = pool["name"]
        now = time.monotonic()
        with self._guard:
            asked = self._handed.pop(name, None)
            if asked is None or now - asked >= 2.0:
                self._handed[name] = now
                return
        raise PluginError(
            f"pool {name!r} ({pool['cidr']}) is on a subnet this host already routes (in "
            f"L2 mode the hosts' own subnet, in BGP mode its blocks), which Docker accepts "
            f"only when the network names it: add --subnet {pool['cidr']}", 400)

    def release_pool(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        # pools live in the central IPAM: nothing to free here
        with self._guard:
            self._handed.pop(str(req.get("PoolID") or ""), None)
        return {}

    # --- addresses ------------------------------------------------------------------------

    def request_address(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        pool_name = str(req["PoolID"])
        wanted = str(req.get("Address") or "") or None
        options = req.get("Options") or {}
        if options.get(ADDRESS_TYPE) == GATEWAY_TYPE:
            pool = self._pool(pool_name)
            gateway = pool.get("gateway")
            if not gateway:
                raise PluginError(f"pool {pool_name!r} has no gateway", 400)
            if wanted and ipaddress.ip_address(wanted) != ipaddress.ip_address(gateway):
                raise PluginError(f"pool {pool_name!r} has gateway {gateway}; --gateway "
                                  f"{wanted} is not it", 400)
            return {"Address": f"{gateway}/{self._prefix(pool)}", "Data": {}}
        mac = options.get(MAC_OPTION)
        if not mac:
            raise PluginError("addresses go to container endpoints only (--aux-address is "
                              "not supported): reserve infrastructure "
                              "addresses in the IPAM with 'netctl ip reserve'", 400)
        mac = normalize_mac(str(mac))
        owner = PENDING + mac.replace(":", "")
        labels = {PLUGIN_LABEL: PLUGIN}
        with self.agent.locks.hold((owner, IFNAME)):
            try:
                alloc = self.ipam.allocate(pool_name, owner, IFNAME, host=self.host,
                                           labels=labels, ip=wanted, mac=mac)
            except AddressInUse:
                handle = self._handle_asking(wanted) if wanted else None
                if handle is None:
                    raise
                alloc = self.ipam.allocate(pool_name, owner, IFNAME, host=self.host,
                                           labels={**labels, "container_name": handle},
                                           ip=wanted, mac=mac, handle=handle)
            self.state.put_docker_address(DockerAddress(pool_name, alloc["ip"], owner,
                                                        alloc["mac"]))
        if self.agent.driver.routed:  # a host route: the /32, as Calico's driver answers
            return {"Address": f"{alloc['ip']}/32", "Data": {}}
        return {"Address": alloc["address"], "Data": {}}

    def _handle_asking(self, ip: str) -> str | None:
        """The handle ``ip`` is reserved for, when that container is the one asking."""
        try:
            st = self.ipam.show(ip)
        except NetdError:
            return None
        handle = st.get("handle")
        if st.get("state") != "reserved" or not handle or self.docker is None:
            return None
        return str(handle) if self.docker.container_asks_for(str(handle), ip) else None

    def release_address(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        pool, ip = str(req["PoolID"]), str(req["Address"])
        rec = self.state.docker_address(pool, ip)
        if rec is None or not rec.owner.startswith(PENDING):
            return {}  # the gateway, or an endpoint's address (DeleteEndpoint released it)
        self._release_pending(rec, "ReleaseAddress")
        return {}

    def _release_pending(self, rec: DockerAddress, why: str) -> None:
        self.agent.release(rec.pool, rec.owner, IFNAME, rec.ip, why)
        self.state.delete_docker_address(rec.pool, rec.ip, rec.owner)

    # --- networks -------------------------------------------------------------------------

    def create_network(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        nid = str(req["NetworkID"])
        v4 = req.get("IPv4Data") or []
        if req.get("IPv6Data"):
            raise PluginError("IPv6 networks are not available through the Docker driver yet",
                              400)
        if len(v4) != 1:
            raise PluginError("a netd network has exactly one IPv4 pool", 400)
        data = v4[0]
        if data.get("AddressSpace") != ADDRESS_SPACE:
            raise PluginError("the netd network driver needs the netd IPAM driver: docker "
                              "network create -d netd --ipam-driver netd --ipam-opt pool=POOL "
                              "NAME", 400)
        cidr = str(ipaddress.ip_network(str(data["Pool"]), strict=False))
        pool = next((p for p in self.ipam.list_pools()["pools"] if p["cidr"] == cidr), None)
        if pool is None:
            raise PluginError(f"no pool has subnet {cidr}", 404)
        try:  # the vlan mode: a pool without a VLAN or off the trunk, refused now
            self.agent.check_pool(pool)
        except NetdError as exc:
            raise PluginError(exc.message, 400) from None
        gateway = _ip_of(str(data.get("Gateway") or "")) or pool.get("gateway")
        self.state.put_docker_network(DockerNetwork(nid, pool["name"], cidr, gateway))
        with self._guard:
            self._handed.pop(pool["name"], None)
        log.info("docker: network %s on pool %s (%s)", nid[:12], pool["name"], cidr)
        return {}

    def delete_network(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        nid = str(req["NetworkID"])
        for att in self.state.all(nid, PLUGIN):
            self._teardown(att, "network deleted")
        self.state.delete_docker_network(nid)
        return {}

    def _network(self, nid: str) -> DockerNetwork:
        net = self.state.docker_network(nid)
        if net is None:
            raise PluginError(f"network {nid[:12]} is unknown to the netd agent of "
                              f"{self.host}", 404)
        return net

    # --- endpoints ------------------------------------------------------------------------

    def create_endpoint(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        nid, eid = str(req["NetworkID"]), str(req["EndpointID"])
        iface = req.get("Interface") or {}
        address = str(iface.get("Address") or "")
        mac = str(iface.get("MacAddress") or "")
        if iface.get("AddressIPv6"):
            raise PluginError("IPv6 addresses are not available through the Docker driver yet",
                              400)
        net = self._network(nid)
        ip = _ip_of(address) or None
        holder = self._holder(net.pool, ip) if ip else None
        labels = {PLUGIN_LABEL: PLUGIN, "netd.network": nid, "docker.network": nid[:12]}
        try:
            att = self.agent.add(EndpointRequest(
                network=nid, container_id=eid, ifname=IFNAME, pool=net.pool, plugin=PLUGIN,
                netns=None, labels=labels, ip=ip, mac=normalize_mac(mac) if mac else None,
                adopt_from=holder))
        except DuplicateAddress as exc:
            if holder is not None:  # the address went back to the IPAM, reserved
                self.state.delete_docker_address(net.pool, ip or "", holder)
            raise PluginError(f"{exc.message}; run the container again for another "
                              "address", 409) from None
        except InterfaceInUse as exc:
            raise PluginError(exc.message, 409) from None
        if att.ip:
            self.state.put_docker_address(DockerAddress(net.pool, att.ip, eid, att.mac or ""))
            if holder is not None and holder != eid:
                self.state.delete_docker_address(net.pool, att.ip, holder)
        log.info("docker: endpoint %s: %s %s on pool %s", eid[:12], att.address, att.mac,
                 att.pool)
        return self._filled(address, mac, att)

    def _holder(self, pool: str, ip: str) -> str:
        """Who holds ``ip`` for this driver (the provisional owner RequestAddress used)."""
        rec = self.state.docker_address(pool, ip)
        if rec is not None:
            return rec.owner
        st = self.ipam.show(ip)
        if (st.get("state") == "allocated" and st.get("host") == self.host
                and (st.get("labels") or {}).get(PLUGIN_LABEL) == PLUGIN):
            return str(st["container_id"])
        raise PluginError(f"{ip} was not handed out by the netd IPAM driver of "
                          f"{self.host}; use --ipam-driver netd", 400)

    @staticmethod
    def _filled(address: str, mac: str, att: Attachment) -> dict[str, Any]:
        """CreateEndpoint's answer: only what Docker left empty."""
        out: dict[str, str] = {}
        if not address and att.address:
            out["Address"] = att.address
        if not mac and att.mac:
            out["MacAddress"] = att.mac
        return {"Interface": out} if out else {}

    def _attachment(self, nid: str, eid: str) -> Attachment | None:
        return self.state.get(nid, eid, IFNAME)

    def endpoint_info(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        att = self._attachment(str(req["NetworkID"]), str(req["EndpointID"]))
        if att is None:
            return {"Value": {}}
        return {"Value": {"netd.pool": att.pool, "netd.host_interface": att.host_ifname or "",
                          "netd.host": self.host, "netd.mode": att.mode}}

    def delete_endpoint(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        nid, eid = str(req["NetworkID"]), str(req["EndpointID"])
        att = self._attachment(nid, eid)
        if att is None:
            net = self.state.docker_network(nid)
            self.agent.delete(nid, eid, IFNAME, pool=net.pool if net else "", plugin=PLUGIN)
            return {}
        self._teardown(att, "DeleteEndpoint")
        return {}

    def _teardown(self, att: Attachment, why: str) -> None:
        """The agent's DEL of an endpoint, and the driver's own records of it."""
        self._stop_watcher(att.container_id)
        self.agent.delete(att.network, att.container_id, IFNAME, pool=att.pool, plugin=PLUGIN)
        if att.ip:
            rec = self.state.docker_address(att.pool, att.ip)
            if rec is not None and rec.owner.startswith(PENDING):
                self._release_pending(rec, why)  # interrupted before the hand-over
            self.state.delete_docker_address(att.pool, att.ip, att.container_id)
        log.info("docker: endpoint %s removed (%s), %s released", att.container_id[:12], why,
                 att.ip or "no address")

    # --- join and leave -------------------------------------------------------------------

    def join(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        nid, eid = str(req["NetworkID"]), str(req["EndpointID"])
        sandbox = str(req.get("SandboxKey") or "")
        with self.agent.locks.hold((eid, IFNAME)):
            att = self._attachment(nid, eid)
            if att is None or att.state != "ready" or not att.peer_ifname:
                raise PluginError(f"endpoint {eid[:12]} is unknown to the netd agent of "
                                  f"{self.host}", 404)
            ep, attached = att.endpoint(), att.attached()
            if ep is not None and attached is not None:
                self.agent.driver.repair(ep, attached)  # a repeated Join: the pair again
            att.extra.update(sandbox=sandbox, docker_pid=pid, joined=True)
            self.state.put(att)
            self._start_watcher(att, announce=not self.agent.driver.routed)
        return self._join_answer(att)

    @staticmethod
    def _join_answer(att: Attachment) -> dict[str, Any]:
        """Join's answer: the interface to move in, its routes, its gateway.

        A gateway outside the address's subnet (the BGP mode's 169.254.1.1 for a
        /32) is reached on the link: a connected route to it comes first, as
        libnetwork adds the static routes before the default route.
        """
        routes = []
        if att.gateway and att.address and (ipaddress.ip_address(att.gateway) not in
                                            ipaddress.ip_interface(att.address).network):
            routes.append({"Destination": f"{att.gateway}/32", "RouteType": ROUTE_CONNECTED})
        for dst, gw in att.routes:
            net = ipaddress.ip_network(dst, strict=False)
            if net.prefixlen == 0:
                continue  # the default route comes from Gateway
            if gw is None:
                routes.append({"Destination": str(net), "RouteType": ROUTE_CONNECTED})
            else:
                routes.append({"Destination": str(net), "RouteType": ROUTE_NEXTHOP,
                               "NextHop": gw})
        answer: dict[str, Any] = {"InterfaceName": {"SrcName": att.peer_ifname,
                                                    "DstPrefix": "eth"},
                                  "StaticRoutes": routes, "DisableGatewayService": False}
        if att.gateway:
            answer["Gateway"] = att.gateway
        return answer

    def leave(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        nid, eid = str(req["NetworkID"]), str(req["EndpointID"])
        with self.agent.locks.hold((eid, IFNAME)):
            self._stop_watcher(eid)
            att = self._attachment(nid, eid)
            if att is not None and att.extra.get("joined"):
                att.extra["joined"] = False
                self.state.put(att)
        return {}

    # --- after Join: gratuitous ARP, container name ---------------------------------------

    def _start_watcher(self, att: Attachment, *, announce: bool) -> None:
        stop = threading.Event()
        eid = att.container_id
        with self._guard:
            old = self._watchers.pop(eid, None)
            if old is not None:
                old.set()
            self._watchers[eid] = stop
            self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(target=self._after_join, args=(att, stop, announce),
                                      name=f"docker-{eid[:12]}", daemon=True)
            self._threads.append(thread)
        thread.start()

    def _stop_watcher(self, eid: str) -> None:
        with self._guard:
            stop = self._watchers.pop(eid, None)
        if stop is not None:
            stop.set()

    def _after_join(self, att: Attachment, stop: threading.Event, announce: bool) -> None:
        try:
            if announce and att.ip and att.mac:
                self.announce(str(att.extra.get("sandbox") or ""),
                              int(att.extra.get("docker_pid") or 0), att.mac, att.ip, stop)
            if not att.extra.get("container_name"):
                self._learn_name(att, stop)
        except Exception:
            log.exception("docker: after-join work for endpoint %s failed",
                          att.container_id[:12])
        finally:
            with self._guard:
                if self._watchers.get(att.container_id) is stop:
                    del self._watchers[att.container_id]

    def _learn_name(self, att: Attachment, stop: threading.Event) -> None:
        if self.docker is None:
            return
        deadline = time.monotonic() + self.name_timeout
        delay = 0.05
        name = None
        while not stop.is_set() and time.monotonic() < deadline:
            name = self.docker.endpoint_name(att.network, att.container_id)
            if name:
                break
            stop.wait(delay)
            delay = min(delay * 2, 1.0)
        if not name or stop.is_set():
            if not stop.is_set():
                log.warning("docker: no container name for endpoint %s from dockerd",
                            att.container_id[:12])
            return
        with self.agent.locks.hold((att.container_id, IFNAME)):
            cur = self._attachment(att.network, att.container_id)
            if cur is None or cur.state != "ready" or not cur.ip:
                return
            try:
                self.ipam.update(cur.ip, cur.container_id, ifname=IFNAME,
                                 labels={"container_name": name})
            except NetdError as exc:
                log.warning("docker: cannot label %s with container %s: %s", cur.ip, name,
                            exc.message)
                return
            cur.extra["container_name"] = name
            self.state.put(cur)
        log.info("docker: %s is container %s", att.ip, name)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait for the after-join threads (tests, shutdown); True when none is left."""
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        with self._guard:
            for event in self._watchers.values():
                event.set()

    # --- restart --------------------------------------------------------------------------

    def reconcile(self) -> list[str]:
        """After the agent's reconcile, before serving: what only dockerd can tell.

        Networks and endpoints dockerd no longer has are removed; netd networks
        dockerd has and this agent's records lost are learnt again; addresses
        requested but never given to an endpoint, and Docker addresses of this
        host that no record explains, are released. Runs before the plugin
        socket exists, so no call is in flight. Without an answer from dockerd
        its endpoints are kept (dockerd repeats Leave and DeleteEndpoint for
        its stale ones when it starts).
        """
        done: list[str] = []
        done += self._relearn_networks()
        nets = {n.network_id for n in self.state.docker_networks()}
        nets |= {a.network for a in self.state.all(plugin=PLUGIN)}
        for nid in sorted(nets):
            done += self._reconcile_network(nid)
        for rec in self.state.docker_addresses():
            if rec.owner.startswith(PENDING):
                self._release_pending(rec, "never given to an endpoint")
                done.append(f"released {rec.ip}: requested but never given to an endpoint")
            elif not self.state.of_owner(rec.owner, IFNAME):
                self.state.delete_docker_address(rec.pool, rec.ip, rec.owner)
        done += self._release_leaks()
        for line in done:
            log.info("docker reconcile: %s", line)
        return done

    def _relearn_networks(self) -> list[str]:
        """netd networks dockerd has that the records lost (a lost state_dir)."""
        if self.docker is None:
            return []
        nets = self.docker.networks(ADDRESS_SPACE)
        if not nets:
            return []
        known = {n.network_id for n in self.state.docker_networks()}
        done = []
        pools = None
        for doc in nets:
            nid = str(doc.get("Id") or "")
            configs = ((doc.get("IPAM") or {}).get("Config") or [])
            if not nid or nid in known or not configs:
                continue
            if pools is None:
                pools = self.ipam.list_pools()["pools"]
            subnet = str(configs[0].get("Subnet") or "")
            pool = next((p for p in pools if p["cidr"] == subnet
                         or p["name"] == ((doc.get("IPAM") or {}).get("Options") or {})
                         .get(POOL_OPTION)), None)
            if pool is None:
                continue
            self.state.put_docker_network(DockerNetwork(
                nid, pool["name"], pool["cidr"],
                _ip_of(str(configs[0].get("Gateway") or "")) or pool.get("gateway")))
            done.append(f"learnt network {nid[:12]} (pool {pool['name']}) again from dockerd")
        return done

    def _reconcile_network(self, nid: str) -> list[str]:
        if self.docker is None:
            return []
        try:
            doc = self.docker.network(nid)
        except NetdError as exc:
            log.warning("docker reconcile: %s; keeping network %s as it is", exc.message,
                        nid[:12])
            return []
        atts = self.state.all(nid, PLUGIN)
        if doc is None:
            for att in atts:
                self._teardown(att, "network gone from dockerd")
            self.state.delete_docker_network(nid)
            return [f"removed network {nid[:12]} (gone from dockerd) and its {len(atts)} "
                    "endpoint(s)"]
        live = {str(c.get("EndpointID")) for c in (doc.get("Containers") or {}).values()
                if isinstance(c, dict)}
        done = []
        for att in atts:
            if att.container_id not in live:
                self._teardown(att, "endpoint gone from dockerd")
                done.append(f"removed endpoint {att.container_id[:12]} ({att.ip}): gone from "
                            "dockerd")
            elif att.extra.get("joined", True) and not att.extra.get("container_name"):
                self._start_watcher(att, announce=False)
        return done

    def _release_leaks(self) -> list[str]:
        """Docker addresses the IPAM holds for this host that no record here explains."""
        try:
            held = all_addresses(self.ipam, host=self.host)
        except NetdError as exc:
            log.warning("docker reconcile: cannot list this host's addresses: %s", exc)
            return []
        owners = {r.owner for r in self.state.docker_addresses()}
        owners |= {a.container_id for a in self.state.all(plugin=PLUGIN)}
        done = []
        for a in held:
            if (a.get("labels") or {}).get(PLUGIN_LABEL) != PLUGIN:
                continue
            if a["container_id"] not in owners:
                self.agent.release(a["pool"], a["container_id"], IFNAME, a["ip"], "leak")
                done.append(f"released leaked {a['ip']} of {a['container_id'][:16]}")
        return done


__all__ = ["PENDING", "DockerDriver", "Dockerd", "PluginError"]
