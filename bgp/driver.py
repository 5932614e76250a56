"""The BGP "downward default" mode's container plumbing (``mode = "bgp"``), Calico style.

A container gets its address as a /32 and a default route via the link-local
gateway 169.254.1.1, on-link; nothing else is on its link. The host end of its
veth has a fixed MAC, proxy ARP (answering for 169.254.1.1, without the
default 0.8 s delay), forwarding, and strict reverse-path filtering: a
container can only send from its own address, since the host's only route to
that address is the /32 through this very host end. That /32 is installed in
netd's route protocol (:data:`RTPROT_NETD`), which is how the routing side
(announcements, blackholes per block) tells netd's routes from everyone
else's. No bridge, no duplicate-address probe: the IPAM is the only source of
these addresses and nothing else shares the link.

Routing (the host's blocks announced to its ToRs through exabgp, the default
and the exceptions received and programmed) is the other half of the mode.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from netd.dataplane import veth
from netd.dataplane.driver import (
    Addressing,
    Attached,
    Driver,
    Endpoint,
    Gauge,
    Hold,
    Owned,
    Prepared,
)
from netd.dataplane.errors import DataplaneError
from netd.dataplane.model import AF_INET, RT_SCOPE_LINK, RTN_BLACKHOLE, RTPROT_NETD, Route
from netd.dataplane.netlink import Netlink
from netd.dataplane.uplink import read_sysctl, write_sysctl
from netd.errors import InvalidInput

log = logging.getLogger(__name__)

GATEWAY = "169.254.1.1"  # every container's gateway: answered by the host end's proxy ARP
HOST_MAC = "ee:ee:ee:ee:ee:ee"  # every host end's (Calico's): the container's ARP cache
#: stays valid across a re-made veth
SCOPE = "bgp"  # one BGP agent per host namespace: its marks
MAX_ASN = 4294967294


@dataclass(frozen=True)
class Peer:
    address: str
    asn: int


@dataclass(frozen=True)
class BgpSettings:
    """The ``[bgp]`` table. The session settings serve the speaker (routing half)."""

    asn: int | None = None
    router_id: str | None = None
    peers: tuple[Peer, ...] = ()
    restart_time: int = 120
    hold_time: int = 90
    mtu: int = 1500
    local_address: str | None = None  # the host's address the sessions use (default: kernel's)
    rundir: str = "/run/netd/bgp"  # exabgp's configuration, socket, pid and log
    metric: int = 20  # of the routes received (a management default with a lower one wins)


def host_sysctls(host_ifname: str) -> dict[str, str]:
    """What a container's host end needs: answer ARP for anything routed elsewhere at once,
    forward, and take from the container only what the host routes back to it."""
    return {f"net.ipv4.conf.{host_ifname}.proxy_arp": "1",
            f"net.ipv4.neigh.{host_ifname}.proxy_delay": "0",
            f"net.ipv4.conf.{host_ifname}.forwarding": "1",
            f"net.ipv4.conf.{host_ifname}.rp_filter": "1",
            f"net.ipv6.conf.{host_ifname}.disable_ipv6": "1"}


def _int(table: Mapping[str, Any], key: str, lo: int, hi: int, default: int | None
         ) -> int | None:
    value = table.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidInput(f"[bgp] {key}: an integer {lo}-{hi}, got {value!r}")
    return value


def ipv4_of(value: Any, what: str) -> str:
    """``value`` as an IPv4 address (not 0.0.0.0), or :class:`InvalidInput` naming
    ``what`` (``[bgp] router_id``, ``fabric: core.router_id``...)."""
    try:
        addr = ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        addr = None
    if not isinstance(addr, ipaddress.IPv4Address) or addr.is_unspecified:
        raise InvalidInput(f"{what}: an IPv4 address, got {value!r}")
    return str(addr)


def _ipv4(value: Any, what: str) -> str:
    return ipv4_of(value, f"[bgp] {what}")


def parse_bgp_settings(table: Mapping[str, Any]) -> BgpSettings:
    """``[bgp]`` of agent.toml -> :class:`BgpSettings` (pure)."""
    known = {"asn", "router_id", "peers", "restart_time", "hold_time", "mtu",
             "local_address", "rundir", "metric"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise InvalidInput(f"[bgp]: unknown keys {', '.join(unknown)} (known: "
                           f"{', '.join(sorted(known))})")
    peers_in = table.get("peers", [])
    if not isinstance(peers_in, list):
        raise InvalidInput("[bgp] peers: a list of {address, asn}")
    peers = []
    for i, p in enumerate(peers_in):
        if not isinstance(p, Mapping) or set(p) != {"address", "asn"}:
            raise InvalidInput(f"[bgp] peers[{i}]: exactly address and asn")
        asn = _int(p, "asn", 1, MAX_ASN, None)
        assert asn is not None
        peers.append(Peer(_ipv4(p["address"], f"peers[{i}].address"), asn))
    if len({p.address for p in peers}) != len(peers):
        raise InvalidInput("[bgp] peers: an address appears twice")
    router_id = table.get("router_id")
    hold = _int(table, "hold_time", 3, 65535, 90)
    if hold is not None and hold != 0 and hold < 3:
        raise InvalidInput("[bgp] hold_time: 0 or 3-65535")
    s = BgpSettings(
        asn=_int(table, "asn", 1, MAX_ASN, None),
        router_id=None if router_id is None else _ipv4(router_id, "router_id"),
        peers=tuple(peers),
        restart_time=_int(table, "restart_time", 1, 4095, 120) or 120,
        hold_time=hold or 90,
        mtu=_int(table, "mtu", 576, 9216, 1500) or 1500,
        local_address=(None if table.get("local_address") is None
                       else _ipv4(table["local_address"], "local_address")),
        rundir=_abspath(table.get("rundir", "/run/netd/bgp"), "rundir"),
        metric=_int(table, "metric", 0, 4294967295, 20) or 0,
    )
    if s.peers and (s.asn is None or s.router_id is None):
        raise InvalidInput("[bgp] peers need the host's asn and router_id")
    return s


def _abspath(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise InvalidInput(f"[bgp] {key}: an absolute path, got {value!r}")
    return value


class BgpDriver(Driver):
    """Containers routed as /32s from the host (no bridge)."""

    mode = "bgp"
    settings: BgpSettings
    follows_blocks = True
    routed = True

    def __init__(self, settings: BgpSettings, *, host_netns: str | None = None) -> None:
        super().__init__(settings, host_netns=host_netns)
        self.dad_timeout = 0.0  # the IPAM is the only source of these addresses
        self._blocks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
        self.speaker: Any = None  # netd.bgp.speaker.Speaker, with [bgp] peers
        self._program_lock = threading.Lock()
        self._started = time.monotonic()
        self._expiry: threading.Timer | None = None

    @classmethod
    def parse_settings(cls, table: Mapping[str, Any]) -> BgpSettings:
        return parse_bgp_settings(table)

    @property
    def scope(self) -> str:
        return SCOPE

    # --- host -------------------------------------------------------------------------

    def plan(self) -> list[str]:
        return [f"sysctl -w net.ipv4.ip_forward=1  # {GATEWAY} and the /32s are routed"]

    def start(self) -> list[str]:
        changes = []
        if read_sysctl("net.ipv4.ip_forward", self.host_netns) != "1":
            write_sysctl("net.ipv4.ip_forward", "1", self.host_netns)
            changes.append("sysctl -w net.ipv4.ip_forward=1")
        s = self.settings
        if s.peers:
            from .speaker import Speaker

            assert s.router_id is not None
            self.speaker = Speaker(s, Path(s.rundir), router_id=s.router_id,
                                   local_address=s.local_address, netns=self.host_netns,
                                   on_change=self._program_quietly)
            # what the host announced before a restart is in the kernel (its blocks'
            # blackholes, its containers' /32s): announced again without the IPAM
            self._blocks = tuple(ipaddress.ip_network(b) for b in sorted(self.blackholes()))
            self._started = time.monotonic()
            self.speaker.start()
            self.announce()
            changes.append(f"exabgp (pid {self.speaker.pid}) speaking to "
                           + ", ".join(f"{p.address} (AS {p.asn})" for p in s.peers))
        return changes

    def stop(self) -> None:
        """exabgp killed without a NOTIFICATION: the peers keep the routes for the restart
        time, so a restarting agent loses none (and one gone for good, all after it)."""
        if self._expiry is not None:
            self._expiry.cancel()
        if self.speaker is not None:
            self.speaker.stop(graceful=True)
            self.speaker = None

    # --- routes from the peers (the agent programs the kernel; exabgp does not) ---------

    def _learned(self, nl: Netlink) -> dict[str, Route]:
        """netd's routes from BGP in the kernel: netd's protocol, with a next hop (the
        containers' /32s and the blackholes have none)."""
        return {r.dst: r for r in nl.routes(family=AF_INET)
                if r.proto == RTPROT_NETD and (r.gateway or r.multipath)}

    def _route(self, dst: str, hops: Sequence[str]) -> Route:
        if len(hops) == 1:
            return Route(dst, gateway=hops[0], proto=RTPROT_NETD, metric=self.settings.metric)
        return Route(dst, proto=RTPROT_NETD, metric=self.settings.metric,
                     multipath=tuple(hops))

    def program(self) -> list[str]:
        """The kernel's BGP routes as the peers' routes want them (netd.bgp.routes)."""
        sp = self.speaker
        if sp is None:
            return []
        from .routes import usable, wanted

        now = time.monotonic()
        stale = float(self.settings.restart_time)
        with self._program_lock:
            with sp._state:
                ribs = {p: replace(r, routes=dict(r.routes)) for p, r in sp.ribs.items()}
                announced = set(sp.announced)
            want = wanted(ribs, [str(b) for b in self._blocks], announced, now=now,
                          stale_after=stale)
            desired = {} if not want.default else {"0.0.0.0/0": self._route("0.0.0.0/0",
                                                                          want.default)}
            desired |= {p: self._route(p, hops) for p, hops in want.exceptions.items()}
            changes = []
            with Netlink(self.host_netns) as nl:
                present = self._learned(nl)
                for dst, r in desired.items():
                    have = present.get(dst)
                    if have is None or have.gateway != r.gateway \
                            or have.multipath != r.multipath or have.metric != r.metric:
                        nl.replace_route(r)
                        hops = r.multipath or (r.gateway or "",)
                        changes.append(f"route {dst} via {', '.join(hops)}")
                # graceful restart on our side: what an earlier run installed stays until
                # every peer that is up has sent all it has (End-of-RIB), or for the
                # restart time
                complete = all(r.eor for r in ribs.values() if r.up) and any(
                    r.up for r in ribs.values())
                keep_stale = not complete and now - self._started < stale
                for dst, r in present.items():
                    if dst not in desired and not keep_stale:
                        nl.del_route(Route(dst, proto=RTPROT_NETD, metric=r.metric))
                        changes.append(f"route {dst} removed")
            # a peer down within its restart time: look again when its routes go stale
            pending = [r.down_since + stale - now for r in ribs.values()
                       if not r.up and r.down_since is not None and usable(r, now, stale)]
            if keep_stale:
                pending.append(self._started + stale - now)
            if pending:
                if self._expiry is not None:
                    self._expiry.cancel()
                self._expiry = threading.Timer(min(pending) + 0.05, self.program)
                self._expiry.daemon = True
                self._expiry.start()
        for line in changes:
            log.info("bgp: %s", line)
        return changes

    def _program_quietly(self) -> None:
        try:
            self.program()
        except DataplaneError as exc:
            log.warning("bgp: programming the received routes failed: %s", exc.message)

    def status(self) -> dict[str, Any]:
        with Netlink(self.host_netns) as nl:
            learnt = len(self._learned(nl))
        return {"asn": self.settings.asn, "blocks": [str(b) for b in self._blocks],
                "routes_installed": learnt,
                "speaker": self.speaker.status() if self.speaker is not None else None}

    def gauges(self, status: Mapping[str, Any]) -> list[Gauge]:
        speaker = status.get("speaker") or {}
        peers = sorted((speaker.get("peers") or {}).items())
        return [
            Gauge("bgp_session_up", "1 when the session to the peer is established",
                  tuple(((p,), 1.0 if s.get("up") else 0.0) for p, s in peers), ("peer",)),
            Gauge("bgp_routes_received", "routes received from the peer",
                  tuple(((p,), float(s.get("received", 0))) for p, s in peers), ("peer",)),
            Gauge("bgp_routes_announced", "prefixes announced to the peers",
                  (((), float(speaker.get("announced", 0))),)),
            Gauge("bgp_routes_installed", "routes from the peers in the kernel",
                  (((), float(status.get("routes_installed", 0))),)),
        ]

    def container_routes(self) -> list[str]:
        """The /32s of this host's containers (from the kernel: the source of truth)."""
        with Netlink(self.host_netns) as nl:
            return [r.dst for r in nl.routes(family=AF_INET)
                    if r.proto == RTPROT_NETD and r.ifname and not r.gateway
                    and r.type != RTN_BLACKHOLE and r.network.prefixlen == 32]

    def announce(self) -> list[str]:
        """What the host announces (its blocks, its borrowed addresses) to its peers."""
        if self.speaker is None:
            return []
        from .routes import announcements

        done: list[str] = self.speaker.set_announced(
            announcements([str(b) for b in self._blocks], self.container_routes()))
        return done

    def _announce_quietly(self) -> None:
        try:
            self.announce()
        except DataplaneError as exc:  # the next sync pass announces again
            log.warning("bgp: announcing failed: %s", exc.message)

    # --- the host's blocks -------------------------------------------------------------

    @staticmethod
    def blackhole(cidr: str) -> Route:
        """A block's blackhole: traffic to an unused address of it stops here (without
        it, it loops between host and ToR until its TTL runs out); the /32s of the
        containers are more specific."""
        return Route(str(ipaddress.ip_network(cidr)), proto=RTPROT_NETD, type=RTN_BLACKHOLE)

    def blackholes(self) -> set[str]:
        with Netlink(self.host_netns) as nl:
            return {r.dst for r in nl.routes(family=AF_INET)
                    if r.type == RTN_BLACKHOLE and r.proto == RTPROT_NETD}

    def sync_blocks(self, blocks: Sequence[str]) -> list[str]:
        """One blackhole route per block this host owns (netd's protocol), and none for a
        block it no longer owns."""
        want = {str(ipaddress.ip_network(b)) for b in blocks
                if ipaddress.ip_network(b).version == 4}
        have = self.blackholes()
        changes = []
        with Netlink(self.host_netns) as nl:
            for cidr in sorted(want - have):
                nl.add_route(self.blackhole(cidr))
                changes.append(f"ip route add blackhole {cidr} proto {RTPROT_NETD}")
            for cidr in sorted(have - want):
                nl.del_route(self.blackhole(cidr))
                changes.append(f"ip route del blackhole {cidr}  # block released")
        self._blocks = tuple(ipaddress.ip_network(b) for b in sorted(want))
        if self.speaker is not None:
            changes += self.announce()
            self.program()  # exceptions are judged against the blocks
        return changes

    def covers(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return any(addr in b for b in self._blocks)

    # --- endpoints --------------------------------------------------------------------

    def _names(self, ep: Endpoint) -> veth.Names:
        return veth.Names(ep.host_ifname, ep.ifname, ep.netns, ep.peer_ifname)

    def _host_end(self, host: Netlink, host_ifname: str) -> None:
        """The host end's MAC and sysctls (idempotent)."""
        link = host.link(host_ifname)
        if link is not None and (link.mac or "").lower() != HOST_MAC:
            host.set_mac(host_ifname, HOST_MAC)
        for key, value in host_sysctls(host_ifname).items():
            write_sysctl(key, value, self.host_netns)

    def prepare(self, ep: Endpoint) -> veth.Veth:
        """The veth and its host end's settings while the IPAM allocates; no route yet
        (nothing reaches the container, rp_filter drops what it sends)."""
        host = Netlink(self.host_netns)
        try:
            pair = veth.create(self._names(ep), self.mark(ep), host=host,
                               mtu=self.settings.mtu)
            try:
                self._host_end(host, ep.host_ifname)
            except BaseException:
                pair.remove()
                pair.close()
                raise
        except BaseException:
            host.close()
            raise
        pair.own_host = True
        return pair

    @staticmethod
    def host_route(host_ifname: str, address: str) -> Route:
        ip = veth.interface(address).ip
        return Route(f"{ip}/{ip.max_prefixlen}", ifname=host_ifname, proto=RTPROT_NETD,
                     scope=RT_SCOPE_LINK)

    def expected(self, ep: Endpoint, addressing: Addressing) -> Attached:
        ifname = ep.peer_ifname if ep.handover and ep.peer_ifname else ep.ifname
        ip = veth.interface(addressing.address).ip
        return Attached(ep.host_ifname, ifname, addressing.mac, f"{ip}/{ip.max_prefixlen}",
                        GATEWAY, (), self.settings.mtu, None, {"gateway": "proxy-arp"},
                        tuple(addressing.allowed))

    def attach(self, ep: Endpoint, addressing: Addressing,
               prepared: Prepared | None = None) -> Attached:
        pair = prepared if isinstance(prepared, veth.Veth) else None
        if prepared is not None and pair is None:
            prepared.close()
        if pair is None:
            pair = self.prepare(ep)
        elif pair.names != self._names(ep):
            pair.close()
            raise ValueError("the prepared veth is for another endpoint")
        expected = self.expected(ep, addressing)
        try:
            assert pair.host is not None
            pair.host.add_route(self.host_route(ep.host_ifname, expected.address))
        except BaseException:
            pair.remove()
            pair.close()
            raise
        done = veth.finish(pair, expected.address, addressing.mac, GATEWAY, (),
                           dad_timeout=0.0, announce=False)
        if self.speaker is not None and not self.covers(addressing.ip):
            self._announce_quietly()  # a borrowed address: its /32 to the peers
        return Attached(ep.host_ifname, done.ifname, done.mac, expected.address, GATEWAY,
                        expected.routes, done.mtu, None, expected.data, expected.allowed)

    def _ours(self, alias: str | None, ep: Endpoint | None) -> bool:
        mark = veth.Mark.parse(alias)
        if mark is None or mark.scope != self.scope:
            return False
        return ep is None or (mark.container_id, mark.ifname) == ep.owner

    def detach(self, ep: Endpoint, *, owner_only: bool = False) -> bool:
        """The veth; its /32 goes with its host end."""
        with Netlink(self.host_netns) as host:
            if owner_only:
                link = host.link(ep.host_ifname)
                if link is None:
                    return False
                if not self._ours(link.alias, ep):
                    log.info("bgp: DEL of %s/%s: %s is not its (alias %r), left alone",
                             ep.container_id[:12], ep.ifname, ep.host_ifname, link.alias)
                    return False
            gone = veth.detach(ep.host_ifname, host=host)
        if self.speaker is not None:
            self._announce_quietly()  # a borrowed address's /32 withdrawn
        return gone

    def check(self, ep: Endpoint, attached: Attached) -> list[str]:
        problems: list[str] = []
        with Netlink(self.host_netns) as host:
            end, end_problems = veth.check_host_end(host, ep.host_ifname, None)
            problems += end_problems
            if end is not None:
                want = self.host_route(ep.host_ifname, attached.address)
                if not any(r.network == want.network and r.proto == RTPROT_NETD
                           for r in host.routes(ep.host_ifname)):
                    problems.append(f"route {want.dst} dev {ep.host_ifname} is missing")
                if (end.mac or "").lower() != HOST_MAC:
                    problems.append(f"{ep.host_ifname} has MAC {end.mac}, expected {HOST_MAC}")
        if end is not None:
            for key, value in host_sysctls(ep.host_ifname).items():
                if read_sysctl(key, self.host_netns) not in (value, None):
                    problems.append(f"{key} is not {value}")
        if ep.handover:
            return problems
        return problems + veth.check_container(ep.netns or "", ep.ifname, attached.mac,
                                               attached.address, attached.gateway,
                                               attached.pool_routes())

    def repair(self, ep: Endpoint, attached: Attached) -> bool:
        if not self.check(ep, attached):
            return False
        if ep.handover:
            with Netlink(self.host_netns) as host:
                if host.link(ep.host_ifname) is None:
                    log.warning("bgp: %s of %s is gone; its runtime must attach the "
                                "container again", ep.host_ifname, ep.container_id[:12])
                    return False
                self._host_end(host, ep.host_ifname)
                host.set_up(ep.host_ifname)
                host.add_route(self.host_route(ep.host_ifname, attached.address))
            return True
        # the pair of this mark is taken over when it is there, made again when not
        pair = veth.create(self._names(ep), self.mark(ep), host=self.host_netns,
                           mtu=attached.mtu or self.settings.mtu, mac=attached.mac)
        try:
            assert pair.host is not None
            self._host_end(pair.host, ep.host_ifname)
            pair.host.set_up(ep.host_ifname)
            pair.host.add_route(self.host_route(ep.host_ifname, attached.address))
        except BaseException:
            pair.close()
            raise
        veth.finish(pair, attached.address, attached.mac, GATEWAY, (), dad_timeout=0.0,
                    announce=False)
        return True

    def owned(self) -> list[Owned]:
        return [Owned(link.name, mark, link.index)
                for link, mark in veth.scoped_host_ends(self.scope, host=self.host_netns)]

    def sweep(self, keep: Collection[str], *, hold: Hold | None = None) -> list[str]:
        """Orphaned host ends of this scope (their /32s go with them)."""
        with Netlink(self.host_netns) as host:
            return veth.sweep_host_ends(self.scope, keep, host=host, hold=hold)


__all__ = ["GATEWAY", "HOST_MAC", "BgpDriver", "BgpSettings", "Peer", "host_sysctls",
           "parse_bgp_settings"]
