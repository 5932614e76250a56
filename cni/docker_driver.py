"""Docker's libnetwork remote driver, network and IPAM, on top of the agent's collaborators.

:class:`DockerDriver` answers every call of the remote plugin protocol
(``Plugin.Activate``, ``NetworkDriver.*``, ``IpamDriver.*``; field names as in
libnetwork's ``drivers/remote/api`` and ``ipams/remote/api``); the HTTP side is
:mod:`netd.agent.docker`. Its records live in the agent's state
(:mod:`netd.agent.state`), so an agent restart loses nothing.

Who owns an address. libnetwork asks the IPAM driver for an address
(``RequestAddress``) *before* it creates the endpoint, and neither call names
the container. So:

1. ``RequestAddress`` allocates in the IPAM for a provisional owner
   ``docker-pending-<mac>`` (``RequiresMACAddress`` makes Docker send the
   endpoint's MAC, random or ``--mac-address``; the IPAM records it), host =
   this agent, label ``netd.plugin=docker``. Same MAC, same answer.
2. ``CreateEndpoint`` hands the address to the endpoint: owner
   (EndpointID, ``eth0``), label ``docker.network`` (IPAM ``update``).
3. After ``Join`` a background thread reads the endpoint's name (= the
   container's name) from dockerd's API (``docker_host``) and labels the
   address ``container_name=<name>``; ``netctl ip list`` shows it.

``DeleteEndpoint`` releases the endpoint's address (queued when the IPAM is
unreachable); ``ReleaseAddress`` releases only what is still provisional (an
endpoint that was never created), so a late call can never free an address
that meanwhile went to someone else.

Fixed addresses: ``--ip`` arrives as the preferred address. When the IPAM
holds it reserved for a handle, the address goes to the container only when
dockerd has a container of that name asking for that address.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from netd.agent.config import AgentConfig
from netd.agent.docker_api import DockerApi, DockerUnreachable
from netd.agent.docker_link import VethLinks
from netd.agent.state import DockerAddress, DockerEndpoint, DockerNetwork, StateStore
from netd.dataplane.model import normalize_mac
from netd.errors import AddressInUse, NetdError, PoolNotFound, Unavailable
from netd.ipam.client import IpamApi

log = logging.getLogger("netd.agent.docker")

ADDRESS_SPACE = "netd"
IFNAME = "eth0"  # the interface name every Docker address carries in the IPAM
PENDING = "docker-pending-"
MAC_OPTION = "com.docker.network.endpoint.macaddress"
ADDRESS_TYPE = "RequestAddressType"
GATEWAY_TYPE = "com.docker.network.gateway"
GATEWAY_DATA = "com.docker.network.gateway"
POOL_OPTION = "pool"
ROUTE_NEXTHOP = 0  # libnetwork types.NEXTHOP
PLUGIN_LABEL = {"netd.plugin": "docker"}
NAME_TIMEOUT = 30.0


class PluginError(Exception):
    """An answer ``{"Err": message}`` with an HTTP status (Docker shows the message)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message = message if message.startswith("netd: ") else f"netd: {message}"
        self.status = status


class Links(Protocol):
    """The dataplane edge (:mod:`netd.agent.docker_link`); tests pass a fake."""

    def create_pair(self, endpoint_id: str, bridge: str, mac: str) -> tuple[str, str]: ...
    def delete_pair(self, endpoint_id: str) -> bool: ...
    def names(self, endpoint_id: str) -> tuple[str, str]: ...
    def present(self) -> list[str]: ...
    def remove(self, name: str) -> None: ...
    def announce(self, sandbox: str, docker_pid: int, host_ifname: str, mac: str, ip: str,
                 stop: threading.Event) -> bool: ...


def _netd_error(exc: NetdError) -> PluginError:
    if isinstance(exc, Unavailable):
        return PluginError(f"the IPAM is unreachable, try again: {exc.message}", 503)
    return PluginError(exc.message, 400 if exc.status < 500 else 500)


def _ip_of(address: str) -> str:
    return address.split("/", 1)[0]


class DockerDriver:
    """The network and IPAM driver ``netd`` for one host. Starts nothing by itself."""

    def __init__(self, cfg: AgentConfig, ipam: IpamApi, state: StateStore, *,
                 release_ipam: IpamApi | None = None, docker: DockerApi | None = None,
                 links: Links | None = None, bridge: str | None = None) -> None:
        self.cfg = cfg
        self.ipam = ipam
        self.release_ipam = release_ipam or ipam
        self.state = state
        self.docker = docker
        self.links = links or VethLinks()
        self.bridge = bridge or cfg.l2.bridge
        self.name_timeout = NAME_TIMEOUT
        self._locks: dict[str, threading.Lock] = {}
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

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield
        with self._guard:
            if not lock.locked():
                self._locks.pop(key, None)

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
            f"L2 mode the hosts' own subnet), which Docker accepts only when the network "
            f"names it: add --subnet {pool['cidr']}", 400)

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
        try:
            alloc = self.ipam.allocate(pool_name, owner, IFNAME, host=self.cfg.host,
                                       labels=dict(PLUGIN_LABEL), ip=wanted, mac=mac)
        except AddressInUse:
            handle = self._handle_asking(wanted) if wanted else None
            if handle is None:
                raise
            alloc = self.ipam.allocate(pool_name, owner, IFNAME, host=self.cfg.host,
                                       labels={**PLUGIN_LABEL, "container_name": handle},
                                       ip=wanted, mac=mac, handle=handle)
        self.state.put_docker_address(DockerAddress(pool_name, alloc["ip"], owner, alloc["mac"]))
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
        self._release(pool, rec.owner, ip, "ReleaseAddress")
        self.state.delete_docker_address(pool, ip, rec.owner)
        return {}

    def _release(self, pool: str, owner: str, ip: str | None, why: str) -> None:
        try:
            self.release_ipam.release(pool=pool, container_id=owner, ifname=IFNAME)
        except Unavailable as exc:
            log.warning("docker: IPAM unreachable; release of %s (%s) queued (%s)", ip, owner,
                        why)
            self.state.queue_release(pool, owner, IFNAME, ip, exc.message)
        except PoolNotFound:
            pass

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
        gateway = _ip_of(str(data.get("Gateway") or "")) or pool.get("gateway")
        self.state.put_docker_network(DockerNetwork(nid, pool["name"], cidr, gateway))
        with self._guard:
            self._handed.pop(pool["name"], None)
        log.info("docker: network %s on pool %s (%s)", nid[:12], pool["name"], cidr)
        return {}

    def delete_network(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        nid = str(req["NetworkID"])
        for ep in self.state.docker_endpoints(nid):
            self._teardown(ep, "network deleted")
        self.state.delete_docker_network(nid)
        return {}

    def _network(self, nid: str) -> DockerNetwork:
        net = self.state.docker_network(nid)
        if net is None:
            raise PluginError(f"network {nid[:12]} is unknown to the netd agent of "
                              f"{self.cfg.host}", 404)
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
        with self._locked(eid):
            ep = self.state.docker_endpoint(eid)
            if ep is not None and ep.state != "creating":
                return self._filled(address, mac, ep)
            host, peer = self.links.names(eid)
            labels = {**PLUGIN_LABEL, "docker.network": nid[:12]}
            ep = DockerEndpoint(eid, nid, net.pool, _ip_of(address), address,
                                normalize_mac(mac) if mac else "", "creating", host, peer)
            self.state.put_docker_endpoint(ep)  # before anything changes: a crash is undone
            try:
                if address:
                    self._adopt(ep, labels)
                else:  # Docker brought no address: take one for the endpoint
                    alloc = self.ipam.allocate(net.pool, eid, IFNAME, host=self.cfg.host,
                                               labels=labels, mac=ep.mac or None)
                    ep.ip, ep.address, ep.mac = alloc["ip"], alloc["address"], alloc["mac"]
                    self.state.put_docker_address(DockerAddress(net.pool, ep.ip, eid, ep.mac))
            except BaseException:
                self.state.delete_docker_endpoint(eid)
                raise
            ep.state = "created"
            self.state.put_docker_endpoint(ep)
        log.info("docker: endpoint %s: %s %s on pool %s", eid[:12], ep.address, ep.mac, ep.pool)
        return self._filled(address, mac, ep)

    def _adopt(self, ep: DockerEndpoint, labels: dict[str, str]) -> None:
        """Hand the address RequestAddress took to the endpoint (owner EndpointID)."""
        rec = self.state.docker_address(ep.pool, ep.ip)
        holder = rec.owner if rec is not None else None
        if holder is None:
            st = self.ipam.show(ep.ip)
            if (st.get("state") == "allocated" and st.get("host") == self.cfg.host
                    and (st.get("labels") or {}).get("netd.plugin") == "docker"):
                holder = str(st["container_id"])
            else:
                raise PluginError(f"{ep.ip} was not handed out by the netd IPAM driver of "
                                  f"{self.cfg.host}; use --ipam-driver netd", 400)
        alloc = self.ipam.update(ep.ip, holder, ifname=IFNAME,
                                 new_container_id=ep.endpoint_id, labels=labels)
        ep.mac = ep.mac or alloc["mac"]
        self.state.put_docker_address(DockerAddress(ep.pool, ep.ip, ep.endpoint_id, ep.mac))

    @staticmethod
    def _filled(address: str, mac: str, ep: DockerEndpoint) -> dict[str, Any]:
        """CreateEndpoint's answer: only what Docker left empty."""
        out: dict[str, str] = {}
        if not address:
            out["Address"] = ep.address
        if not mac:
            out["MacAddress"] = ep.mac
        return {"Interface": out} if out else {}

    def endpoint_info(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        ep = self.state.docker_endpoint(str(req["EndpointID"]))
        if ep is None:
            return {"Value": {}}
        return {"Value": {"netd.pool": ep.pool, "netd.host_interface": ep.host_ifname,
                          "netd.host": self.cfg.host}}

    def delete_endpoint(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        eid = str(req["EndpointID"])
        with self._locked(eid):
            ep = self.state.docker_endpoint(eid)
            if ep is None:
                self.links.delete_pair(eid)
                return {}
            self._teardown(ep, "DeleteEndpoint")
        return {}

    def _teardown(self, ep: DockerEndpoint, why: str) -> None:
        """Remove an endpoint's veth, release its address (queued if need be), forget it."""
        if ep.state != "deleting":
            ep.state = "deleting"
            self.state.put_docker_endpoint(ep)
        self._stop_watcher(ep.endpoint_id)
        self.links.delete_pair(ep.endpoint_id)
        if ep.ip:
            rec = self.state.docker_address(ep.pool, ep.ip)
            owners = {ep.endpoint_id}
            if rec is not None and rec.owner.startswith(PENDING):
                owners.add(rec.owner)  # interrupted before the hand-over
            for owner in owners:
                self._release(ep.pool, owner, ep.ip, why)
                self.state.delete_docker_address(ep.pool, ep.ip, owner)
        self.state.delete_docker_endpoint(ep.endpoint_id)
        log.info("docker: endpoint %s removed (%s), %s released", ep.endpoint_id[:12], why,
                 ep.ip or "no address")

    # --- join and leave -------------------------------------------------------------------

    def join(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        nid, eid = str(req["NetworkID"]), str(req["EndpointID"])
        sandbox = str(req.get("SandboxKey") or "")
        with self._locked(eid):
            ep = self.state.docker_endpoint(eid)
            if ep is None or ep.state == "deleting":
                raise PluginError(f"endpoint {eid[:12]} is unknown to the netd agent of "
                                  f"{self.cfg.host}", 404)
            pool = self._pool(ep.pool)
            net = self.state.docker_network(nid)
            gateway = pool.get("gateway") or (net.gateway if net else None)
            _, peer = self.links.create_pair(eid, self.bridge, ep.mac)
            ep.state, ep.sandbox, ep.docker_pid = "joined", sandbox, pid
            self.state.put_docker_endpoint(ep)
            self._start_watcher(ep, announce=True)
        routes = []
        for r in pool.get("routes") or []:
            dst = str(ipaddress.ip_network(r["dst"], strict=False))
            if ipaddress.ip_network(dst).prefixlen == 0:
                continue  # the default route comes from Gateway
            routes.append({"Destination": dst, "RouteType": ROUTE_NEXTHOP,
                           "NextHop": r.get("gw") or gateway})
        answer: dict[str, Any] = {"InterfaceName": {"SrcName": peer, "DstPrefix": "eth"},
                                  "StaticRoutes": routes, "DisableGatewayService": False}
        if gateway:
            answer["Gateway"] = gateway
        return answer

    def leave(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        eid = str(req["EndpointID"])
        with self._locked(eid):
            self._stop_watcher(eid)
            ep = self.state.docker_endpoint(eid)
            if ep is not None and ep.state == "joined":
                ep.state = "created"
                self.state.put_docker_endpoint(ep)
        return {}

    # --- after Join: gratuitous ARP, container name ---------------------------------------

    def _start_watcher(self, ep: DockerEndpoint, *, announce: bool) -> None:
        stop = threading.Event()
        with self._guard:
            old = self._watchers.pop(ep.endpoint_id, None)
            if old is not None:
                old.set()
            self._watchers[ep.endpoint_id] = stop
            self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(target=self._after_join, args=(ep, stop, announce),
                                      name=f"docker-{ep.endpoint_id[:12]}", daemon=True)
            self._threads.append(thread)
        thread.start()

    def _stop_watcher(self, eid: str) -> None:
        with self._guard:
            stop = self._watchers.pop(eid, None)
        if stop is not None:
            stop.set()

    def _after_join(self, ep: DockerEndpoint, stop: threading.Event, announce: bool) -> None:
        try:
            if announce:
                self.links.announce(ep.sandbox, ep.docker_pid, ep.host_ifname, ep.mac, ep.ip,
                                    stop)
            if not ep.container_name:
                self._learn_name(ep, stop)
        except Exception:
            log.exception("docker: after-join work for endpoint %s failed", ep.endpoint_id[:12])
        finally:
            with self._guard:
                if self._watchers.get(ep.endpoint_id) is stop:
                    del self._watchers[ep.endpoint_id]

    def _learn_name(self, ep: DockerEndpoint, stop: threading.Event) -> None:
        if self.docker is None:
            return
        deadline = time.monotonic() + self.name_timeout
        delay = 0.05
        name = None
        while not stop.is_set() and time.monotonic() < deadline:
            name = self.docker.endpoint_name(ep.network_id, ep.endpoint_id)
            if name:
                break
            stop.wait(delay)
            delay = min(delay * 2, 1.0)
        if not name or stop.is_set():
            if not stop.is_set():
                log.warning("docker: no container name for endpoint %s from dockerd",
                            ep.endpoint_id[:12])
            return
        with self._locked(ep.endpoint_id):
            cur = self.state.docker_endpoint(ep.endpoint_id)
            if cur is None or cur.state == "deleting":
                return
            try:
                self.ipam.update(cur.ip, cur.endpoint_id, ifname=IFNAME,
                                 labels={"container_name": name})
            except NetdError as exc:
                log.warning("docker: cannot label %s with container %s: %s", cur.ip, name,
                            exc.message)
                return
            cur.container_name = name
            self.state.put_docker_endpoint(cur)
        log.info("docker: %s is container %s", ep.ip, name)

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
        """Before serving: finish what a crash interrupted, drop what dockerd forgot while
        the agent was away, release leaked addresses, sweep orphaned links.

        Runs before the plugin socket exists, so no call is in flight. Without an
        answer from dockerd, its endpoints are kept (dockerd repeats Leave and
        DeleteEndpoint for its stale ones when it starts).
        """
        done: list[str] = []
        for ep in self.state.docker_endpoints():
            if ep.state in ("creating", "deleting"):
                self._teardown(ep, f"interrupted {ep.state}")
                done.append(f"undid interrupted {ep.state} of endpoint {ep.endpoint_id[:12]}")
        nets = {n.network_id for n in self.state.docker_networks()}
        nets |= {ep.network_id for ep in self.state.docker_endpoints()}
        for nid in sorted(nets):
            done += self._reconcile_network(nid)
        for rec in self.state.docker_addresses():
            if rec.owner.startswith(PENDING):
                self._release(rec.pool, rec.owner, rec.ip, "never given to an endpoint")
                self.state.delete_docker_address(rec.pool, rec.ip, rec.owner)
                done.append(f"released {rec.ip}: requested but never given to an endpoint")
        done += self._release_leaks()
        keep: set[str] = set()
        for ep in self.state.docker_endpoints():
            keep.update(self.links.names(ep.endpoint_id))
        for name in self.links.present():
            if name not in keep:
                self.links.remove(name)
                done.append(f"removed orphaned interface {name}")
        for line in done:
            log.info("docker reconcile: %s", line)
        return done

    def _reconcile_network(self, nid: str) -> list[str]:
        if self.docker is None:
            return []
        try:
            doc = self.docker.network(nid)
        except DockerUnreachable as exc:
            log.warning("docker reconcile: %s; keeping network %s as it is", exc, nid[:12])
            return []
        eps = self.state.docker_endpoints(nid)
        if doc is None:
            for ep in eps:
                self._teardown(ep, "network gone from dockerd")
            self.state.delete_docker_network(nid)
            return [f"removed network {nid[:12]} (gone from dockerd) and its {len(eps)} "
                    "endpoint(s)"]
        live = {str(c.get("EndpointID")): str(c.get("Name") or "")
                for c in (doc.get("Containers") or {}).values() if isinstance(c, dict)}
        done = []
        for ep in eps:
            if ep.endpoint_id not in live:
                self._teardown(ep, "endpoint gone from dockerd")
                done.append(f"removed endpoint {ep.endpoint_id[:12]} ({ep.ip}): gone from "
                            "dockerd")
            elif ep.state == "joined" and not ep.container_name:
                self._start_watcher(ep, announce=False)
        return done

    def _release_leaks(self) -> list[str]:
        """Docker addresses the IPAM holds for this host that no record here explains."""
        try:
            held = self.ipam.addresses(host=self.cfg.host, limit=100000)["addresses"]
        except NetdError as exc:
            log.warning("docker reconcile: cannot list this host's addresses: %s", exc)
            return []
        owners = {r.owner for r in self.state.docker_addresses()}
        owners |= {e.endpoint_id for e in self.state.docker_endpoints()}
        done = []
        for a in held:
            if (a.get("labels") or {}).get("netd.plugin") != "docker":
                continue
            if a["container_id"] not in owners:
                self._release(a["pool"], a["container_id"], a["ip"], "leak")
                done.append(f"released leaked {a['ip']} of {a['container_id'][:16]}")
        return done
