"""The L2 bridge driver (``mode = "l2"``): containers on ``br0``, which holds the host's uplink.

What is L2 here and nowhere else: the ``[l2]`` table, the takeover of the
uplink by the bridge (:mod:`netd.dataplane.l2`: plan, rollback, the FORWARD
accept rule), and the host-end step of an endpoint: the veth's host end is
enslaved to the bridge in the very message that creates it, and nothing goes
on the wire before the bridge port forwards. Everything else is the shared
endpoint core (:mod:`netd.dataplane.veth`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from netd.dataplane import l2, nft, veth
from netd.dataplane.driver import Addressing, Attached, Driver, Endpoint, Hold, Owned, Prepared
from netd.dataplane.errors import LinkNotFound, TakeoverFailed
from netd.dataplane.guard import GuardTable, PortGuard, guard_for, table_name
from netd.dataplane.netlink import Netlink
from netd.errors import InvalidInput

log = logging.getLogger(__name__)

#: ARP replies on a layer-2 segment arrive well under a millisecond after the probe
#: (0.06 ms median in the lab), a slow stack's in a millisecond or two; 10 ms (two
#: probes 5 ms apart) is five times that, and every ADD waits it in full (README,
#: "Why 10 ms for dad_timeout").
DEFAULT_DAD_TIMEOUT = 0.01
BR_STATE_FORWARDING = 3
PORT_TIMEOUT = 2.0
REPAIR_GUARD_AGE = 5.0  # a reconcile pass checks every port guard against one listing


@dataclass(frozen=True)
class L2Settings:
    """The ``[l2]`` table."""

    uplink: str = "bond0"
    bridge: str = "br0"
    # take br0 over at start (move the uplink's address, routes and MAC)
    takeover: bool = True
    # after the takeover the default gateway must answer ARP within this time
    gateway_timeout: float = 10.0
    # ARP duplicate-address probe per new address (seconds to wait for an answer; two
    # probes, half of it apart); 0 disables it
    dad_timeout: float = DEFAULT_DAD_TIMEOUT
    # anti-spoofing port guards (nftables bridge family) on every container port
    guard: bool = True


def _ifname(value: Any, key: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 15 or "/" in value \
            or any(c.isspace() or c == ":" for c in value):
        raise InvalidInput(f"[l2] {key}: invalid interface name {value!r}")
    return value


def _seconds(value: Any, key: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidInput(f"[l2] {key}: expected seconds (a number >= 0), got {value!r}")
    return float(value)


def wait_forwarding(host: Netlink, host_ifname: str, state: int | None = None,
                    timeout: float = PORT_TIMEOUT) -> bool:
    """Wait until the bridge forwards on the port; False on timeout.

    A new port forwards only once the kernel's link watcher has seen its
    carrier (usually within a millisecond, up to a second when links churn);
    frames sent before that (a duplicate-detection probe, the gratuitous ARP)
    would be dropped. ``state``: the port state already read.
    """
    deadline = time.monotonic() + timeout
    pause = 0.0002
    while True:
        if state is None:
            state = host.bridge_port_state(host_ifname)
        if state == BR_STATE_FORWARDING:
            return True
        if time.monotonic() >= deadline:
            log.warning("l2: bridge port %s is not forwarding after %g s", host_ifname, timeout)
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.005)
        state = None


class L2Driver(Driver):
    """Containers on ``br0``, which enslaves the uplink (``bond0``) and holds the host's address."""

    mode = "l2"
    settings: L2Settings

    def __init__(self, settings: L2Settings, *, host_netns: str | None = None) -> None:
        super().__init__(settings, host_netns=host_netns)
        self.dad_timeout = settings.dad_timeout
        self._guards: GuardTable | None = None
        self._guards_lock = threading.Lock()

    @classmethod
    def parse_settings(cls, table: Mapping[str, Any]) -> L2Settings:
        known = {"uplink", "bridge", "takeover", "gateway_timeout", "dad_timeout", "guard"}
        unknown = set(table) - known
        if unknown:
            raise InvalidInput(f"unknown [l2] keys: {', '.join(sorted(unknown))}")
        for key in ("takeover", "guard"):
            if not isinstance(table.get(key, True), bool):
                raise InvalidInput(f"[l2] {key}: expected true or false, got "
                                   f"{table[key]!r}")
        takeover, guard = table.get("takeover", True), table.get("guard", True)
        return L2Settings(
            uplink=_ifname(table.get("uplink", "bond0"), "uplink"),
            bridge=_ifname(table.get("bridge", "br0"), "bridge"),
            takeover=takeover,
            gateway_timeout=_seconds(table.get("gateway_timeout"), "gateway_timeout", 10.0),
            dad_timeout=_seconds(table.get("dad_timeout"), "dad_timeout", DEFAULT_DAD_TIMEOUT),
            guard=guard,
        )

    @property
    def scope(self) -> str:
        return self.settings.bridge

    # --- host -----------------------------------------------------------------------

    def plan(self) -> list[str]:
        s = self.settings
        state = l2.read_state(s.uplink, s.bridge, netns=self.host_netns)
        plan = l2.plan_takeover(state)
        if not plan:
            return [f"# {s.bridge} already holds {s.uplink}: nothing to change"]
        return str(plan).splitlines()

    def start(self) -> list[str]:
        s = self.settings
        if not s.takeover:
            with Netlink(self.host_netns) as nl:
                if nl.link(s.bridge) is None:
                    raise TakeoverFailed(f"bridge {s.bridge} does not exist and "
                                         "[l2] takeover = false")
            l2.ensure_bridge_forwarding(s.bridge, netns=self.host_netns)
            changes: list[str] = []
        else:
            result = l2.takeover(s.uplink, s.bridge, netns=self.host_netns,
                                 arp_timeout=s.gateway_timeout)
            changes = [str(step) for step in result.plan]
        if s.guard:
            self.guards().ensure()
            changes.append(f"port guards in nft table bridge {table_name(self.scope)}")
        elif nft.available() and self.guards().exists():
            # [l2] guard = false: stale guards of an earlier run would still filter
            self.guards().delete()
            changes.append(f"removed nft table bridge {table_name(self.scope)} "
                           "([l2] guard = false)")
        return changes

    def stop(self) -> None:
        with self._guards_lock:
            if self._guards is not None:
                self._guards.close()
                self._guards = None

    def guards(self) -> GuardTable:
        """The agent's port guards (its nft table), opened on first use."""
        with self._guards_lock:
            if self._guards is None:
                self._guards = GuardTable(self.scope, self.host_netns)
            return self._guards

    @staticmethod
    def _owner(ep: Endpoint) -> str:
        return f"{ep.container_id}/{ep.ifname}"

    def port_guard(self, ep: Endpoint, attached: Attached) -> PortGuard:
        return guard_for(ep.host_ifname, attached.mac,
                         [attached.address, *attached.allowed], self._owner(ep))

    # --- endpoints ------------------------------------------------------------------

    def _names(self, ep: Endpoint) -> veth.Names:
        return veth.Names(ep.host_ifname, ep.ifname, ep.netns, ep.peer_ifname)

    def _bridge(self, host: Netlink) -> tuple[int, int]:
        br = host.link_brief(self.settings.bridge)
        if br is None:
            raise LinkNotFound(f"bridge {self.settings.bridge} does not exist")
        return br[0].index, br[0].mtu

    def prepare(self, ep: Endpoint) -> veth.Veth:
        """The veth, on the bridge, before the address is known (the agent allocates meanwhile).

        Both ends get the bridge's MTU: a smaller port MTU would lower the bridge's.
        With the guards on, the host end stays down until :meth:`attach` has put the
        port's guard in place: a down port forwards nothing (fail closed, at the cost
        of one link change instead of a guard transaction of its own).
        """
        host = Netlink(self.host_netns)
        try:
            index, mtu = self._bridge(host)
            pair = veth.create(self._names(ep), self.mark(ep), host=host, master=index,
                               mtu=mtu, host_up=not self.settings.guard)
        except BaseException:
            host.close()
            raise
        pair.own_host = True  # closed with the pair, after finish
        return pair

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
        if pair.host is not None and pair.adopted:
            got = pair.host.link(ep.host_ifname)
            if got is not None and got.master != self.settings.bridge:
                pair.host.set_master(ep.host_ifname, self.settings.bridge)
        expected = self.expected(ep, addressing)
        if self.settings.guard:  # before the port comes up: no frame unchecked
            try:
                self.guards().install(self.port_guard(ep, expected))
                if pair.host is not None:
                    pair.host.set_link(ep.host_ifname, up=True)
            except BaseException:
                pair.remove()
                pair.close()
                self.guards().remove(ep.host_ifname)
                raise
        try:
            done = veth.finish(pair, addressing.address, addressing.mac, addressing.gateway,
                               expected.pool_routes(), dad_timeout=self.dad_timeout,
                               ready=self._forwarding)
        except BaseException:
            if self.settings.guard:
                self.guards().remove(ep.host_ifname)
            raise
        return Attached(ep.host_ifname, done.ifname, done.mac, expected.address,
                        expected.gateway, expected.routes, done.mtu, None, expected.data,
                        expected.allowed)

    @staticmethod
    def _forwarding(host: Netlink, host_ifname: str, state: int | None) -> None:
        wait_forwarding(host, host_ifname, state)

    def expected(self, ep: Endpoint, addressing: Addressing) -> Attached:
        ifname = ep.peer_ifname if ep.handover and ep.peer_ifname else ep.ifname
        return Attached(ep.host_ifname, ifname, addressing.mac, addressing.address,
                        addressing.gateway, addressing.all_routes(), addressing.mtu or 0,
                        None, {"bridge": self.settings.bridge}, tuple(addressing.allowed))

    def _ours(self, link_alias: str | None, master: str | None, ep: Endpoint | None) -> bool:
        """A marked host end in this driver's scope (a first-release mark: on our bridge)."""
        mark = veth.Mark.parse(link_alias)
        if mark is None:
            return False
        if ep is not None and (mark.container_id, mark.ifname) != ep.owner:
            return False
        return mark.scope == self.scope or (mark.scope == "" and master == self.settings.bridge)

    def detach(self, ep: Endpoint, *, owner_only: bool = False) -> bool:
        with Netlink(self.host_netns) as host:
            if owner_only:
                link = host.link(ep.host_ifname)
                if link is None:
                    return False
                if not self._ours(link.alias, link.master, ep):
                    log.info("l2: DEL of %s/%s: %s is not its (alias %r), left alone",
                             ep.container_id[:12], ep.ifname, ep.host_ifname, link.alias)
                    return False
            gone = veth.detach(ep.host_ifname, host=host)
        if self.settings.guard:  # after the port: it never forwards unguarded
            self.guards().remove(ep.host_ifname)
        return gone

    def check(self, ep: Endpoint, attached: Attached, *,
              guard_age: float | None = None) -> list[str]:
        """``guard_age``: judge the port guard from a table listing that old (reconcile)."""
        with Netlink(self.host_netns) as host:
            end, problems = veth.check_host_end(host, ep.host_ifname, None)
            if end is not None and end.master != self.settings.bridge:
                problems.append(f"{ep.host_ifname} is not on {self.settings.bridge} "
                                f"(master {end.master})")
        if self.settings.guard:
            problems += self.guards().check(self.port_guard(ep, attached),
                                            max_age=guard_age)
        if ep.handover:
            return problems  # the runtime moved and configured the container end
        return problems + veth.check_container(ep.netns or "", ep.ifname, attached.mac,
                                               attached.address, attached.gateway,
                                               attached.pool_routes())

    def repair(self, ep: Endpoint, attached: Attached) -> bool:
        if not self.check(ep, attached, guard_age=REPAIR_GUARD_AGE):
            return False
        if self.settings.guard:
            guard = self.port_guard(ep, attached)
            if self.guards().check(guard):
                self.guards().install(guard)
        if ep.handover:
            with Netlink(self.host_netns) as host:
                link = host.link(ep.host_ifname)
                if link is None:
                    log.warning("l2: %s of %s is gone; its runtime must attach the container "
                                "again", ep.host_ifname, ep.container_id[:12])
                    return False
                if link.master != self.settings.bridge:
                    host.set_master(ep.host_ifname, self.settings.bridge)
                host.set_up(ep.host_ifname)
            return True
        with Netlink(self.host_netns) as host:
            index, mtu = self._bridge(host)
            link = host.link(ep.host_ifname)
            if link is not None and link.master != self.settings.bridge:
                host.set_master(ep.host_ifname, self.settings.bridge)
            if link is not None and not link.up:
                host.set_up(ep.host_ifname)
        pair = veth.create(self._names(ep), self.mark(ep), host=self.host_netns, master=index,
                           mtu=attached.mtu or mtu, mac=attached.mac)
        veth.finish(pair, attached.address, attached.mac, attached.gateway,
                    attached.pool_routes(), dad_timeout=0.0)
        return True

    def owned(self) -> list[Owned]:
        out = []
        for link, mark in veth.marked_links(host=self.host_netns):
            if mark is not None and not link.name.startswith(veth.PEER_PREFIX) \
                    and self._ours(link.alias, link.master, None):
                out.append(Owned(link.name, mark, link.index))
        return out

    def sweep(self, keep: Collection[str], *, hold: Hold | None = None) -> list[str]:
        """Orphaned host ends: marked in this scope, on no record. (L2 makes nothing else.)"""
        removed = []
        with Netlink(self.host_netns) as host:
            for link, mark in veth.marked_links(host=host):
                if mark is None or not self._ours(link.alias, link.master, None):
                    continue
                with hold(mark.owner) if hold is not None else contextlib.nullcontext():
                    if link.name in keep:
                        continue
                    if veth.detach(link.name, host=host, index=link.index):
                        removed.append(f"removed orphaned interface {link.name} "
                                       f"({link.alias})")
        if self.settings.guard:
            guards = self.guards()
            for name, found in guards.installed().items():
                if found.port is not None and found.port in keep:
                    continue
                owner = found.owner() or ("", name)
                with hold(owner) if hold is not None else contextlib.nullcontext():
                    if found.port is not None and found.port in keep:
                        continue  # an ADD recorded it meanwhile
                    guards.drop(found)
                    removed.append(f"removed the port guard of {name} (no record)")
        return removed


__all__ = ["DEFAULT_DAD_TIMEOUT", "L2Driver", "L2Settings", "wait_forwarding"]
