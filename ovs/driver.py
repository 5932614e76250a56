"""The VLAN trunk mode (``mode = "vlan"``): each container an access port of ``ovs0``.

The host's ``bond0`` is a trunk port of the Open vSwitch bridge ``ovs0``
carrying every VLAN (:mod:`netd.ovs.takeover`); a container's host end is an
access port tagged with its pool's VLAN, and the container gets its IPAM
address and MAC, the pool's gateway and routes. Pools on different VLANs meet
only through a router.

Port security is OpenFlow (:mod:`netd.ovs.flows`) installed by the agent
itself over the bridge's management socket (:mod:`netd.ovs.openflow`): no
controller, ``fail_mode=secure``, so an agent that is down or restarting never
opens the bridge; its flows stay in ovs-vswitchd. A watchdog looks for the
canary flow every ``flow_check_interval`` and reprograms every flow when it is
gone (ovs-vswitchd restarted and came back empty): the host's own address
depends on the flows too. Flows are rebuilt from OVSDB alone (every port
carries its owner, MAC, address and allowed addresses in ``external_ids``),
added before the stale ones are removed (make-before-break), never flushed.

Order of an ADD: while the IPAM allocates, the veth (container end in the
container's namespace, transmit checksumming and GSO off on it: the userspace
datapath fills no checksums in) and its OVSDB port with a chosen ofport, on
the pool's VLAN (the agent knows it from the pool) or else the dead VLAN 4095,
and without flows: fail_mode=secure drops everything it sends. Then the port's
flows and its external_ids (owner, MAC, address), then MAC, probe, addresses,
routes, gratuitous ARP. A DEL removes the flows, the port (not waiting for
ovs-vswitchd: OVSDB has it gone for every reader) and the veth.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
from netd.dataplane.errors import DataplaneError, PoolNotUsable
from netd.dataplane.ethtool import set_gso, set_tx_checksum
from netd.dataplane.netlink import Netlink
from netd.errors import InvalidInput

from . import flows as F
from . import takeover as tk
from .openflow import OpenFlow, OpenFlowError
from .ovsdb import ALLOWED, MARK, OWNER, Ovsdb, OvsdbError, OvsPort

log = logging.getLogger(__name__)

DEFAULT_DAD_TIMEOUT = 0.01
DEAD_VLAN = 4095  # a prepared port's tag until attach (Neutron's DEAD_VLAN_TAG): no VLAN
FIRST_OFPORT = 100  # container ports; below: the uplink (1) and anything an operator adds
DATAPATHS = ("system", "netdev")


@dataclass(frozen=True)
class VlanSettings:
    uplink: str = "bond0"
    bridge: str = "ovs0"
    trunks: tuple[int, ...] = ()  # empty: every VLAN
    datapath_type: str = "system"
    mtu: int = 0  # 0: the uplink's
    ovsdb: str = "unix:/var/run/openvswitch/db.sock"
    rundir: str = "/var/run/openvswitch"
    takeover: bool = True
    gateway_timeout: float = 10.0
    dad_timeout: float = DEFAULT_DAD_TIMEOUT
    flow_check_interval: float = 1.0
    #: netdev only: ovs-vswitchd runs with other_config:userspace-tso-enable=true (it
    #: reads it at start), so the container ends keep their offloads
    userspace_tso: bool = False

    @property
    def offloads_off(self) -> bool:
        """Whether container ends must write their own checksums and segments: the
        userspace datapath without TSO completes no partial checksum (TCP SYNs arrived
        with bad ones while ping worked)."""
        return self.datapath_type == "netdev" and not self.userspace_tso

    @property
    def mgmt(self) -> str:
        return f"{self.rundir.rstrip('/')}/{self.bridge}.mgmt"

    def carries(self, vlan: int) -> bool:
        return not self.trunks or vlan in self.trunks


KEYS = {"uplink": str, "bridge": str, "trunks": list, "datapath_type": str, "mtu": int,
        "ovsdb": str, "rundir": str, "takeover": bool, "gateway_timeout": (int, float),
        "dad_timeout": (int, float), "flow_check_interval": (int, float),
        "userspace_tso": bool}


def parse_vlan_settings(table: Mapping[str, Any]) -> VlanSettings:
    """``[vlan]`` of agent.toml -> :class:`VlanSettings` (pure)."""
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise InvalidInput(f"[vlan]: unknown keys {', '.join(unknown)} (known: "
                           f"{', '.join(sorted(KEYS))})")
    for key, kind in KEYS.items():
        if key in table:
            value = table[key]
            if isinstance(value, bool) and kind is not bool:
                raise InvalidInput(f"[vlan] {key} must be {_kind_name(kind)}")
            if not isinstance(value, kind):  # type: ignore[arg-type]
                raise InvalidInput(f"[vlan] {key} must be {_kind_name(kind)}")
    values: dict[str, Any] = {k: (tuple(v) if k == "trunks" else v) for k, v in table.items()}
    s = VlanSettings(**values)
    for name in (s.uplink, s.bridge):
        if not 0 < len(name.encode()) <= 15 or any(c in name for c in "/: ") \
                or not name.isprintable():
            raise InvalidInput(f"[vlan]: {name!r} is not an interface name")
    if s.uplink == s.bridge:
        raise InvalidInput("[vlan] uplink and bridge must differ")
    if any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4094
           for v in s.trunks):
        raise InvalidInput("[vlan] trunks: VLANs 1-4094 (empty: every VLAN)")
    if s.datapath_type not in DATAPATHS:
        raise InvalidInput(f"[vlan] datapath_type: one of {', '.join(DATAPATHS)} (netdev: "
                           "the userspace datapath, where the kernel has no openvswitch "
                           "module)")
    if s.userspace_tso and s.datapath_type != "netdev":
        raise InvalidInput("[vlan] userspace_tso is for datapath_type = \"netdev\" (the "
                           "kernel datapath offloads on its own)")
    if s.mtu and not 576 <= s.mtu <= 9216:
        raise InvalidInput("[vlan] mtu: 576-9216 (0: the uplink's)")
    if not s.ovsdb.startswith("unix:/") or not s.rundir.startswith("/"):
        raise InvalidInput("[vlan] ovsdb is unix:/PATH of the db socket, rundir an absolute "
                           "path (where ovs-vswitchd puts BRIDGE.mgmt)")
    for key in ("gateway_timeout", "dad_timeout", "flow_check_interval"):
        value = float(getattr(s, key))
        if value < 0 or (key != "dad_timeout" and value == 0) or \
                (key == "dad_timeout" and value >= 1):
            raise InvalidInput(f"[vlan] {key} out of range")
    return s


def _kind_name(kind: Any) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}
    return names.get(kind, "a number")


@dataclass
class _Reprogrammed:
    reason: str
    at: float
    seconds: float
    flows: int
    removed: int


@dataclass
class _Ofports:
    """The ofports this driver handed out and the OVSDB does not show yet."""

    reserved: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class VlanDriver(Driver):
    mode = "vlan"
    checks_pools = True

    def __init__(self, settings: VlanSettings, *, host_netns: str | None = None) -> None:
        super().__init__(settings, host_netns=host_netns)
        self.settings: VlanSettings = settings
        self.dad_timeout = settings.dad_timeout
        self._db: Ovsdb | None = None
        self._of: OpenFlow | None = None
        self._ofports = _Ofports()
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="netd-vlan-io")
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
        self._mtu = settings.mtu
        self.reprogrammed: list[_Reprogrammed] = []

    @classmethod
    def parse_settings(cls, table: Mapping[str, Any]) -> VlanSettings:
        return parse_vlan_settings(table)

    @property
    def scope(self) -> str:
        return self.settings.bridge

    # --- the two channels ---------------------------------------------------------------

    @property
    def db(self) -> Ovsdb:
        if self._db is None:
            self._db = Ovsdb(self.settings.ovsdb)
        return self._db

    @property
    def flows(self) -> OpenFlow:
        if self._of is None:
            self._of = OpenFlow(self.settings.mgmt)
        return self._of

    # --- host ---------------------------------------------------------------------------

    def plan(self) -> list[str]:
        s = self.settings
        if not s.takeover:
            return [f"takeover = false: {s.bridge} must exist; only flows are programmed"]
        state = tk.read_state(s.uplink, s.bridge, self.db, netns=self.host_netns)
        plan = tk.plan_takeover(state, datapath_type=s.datapath_type, trunks=s.trunks,
                                mtu=self.mtu(state.uplink.mtu), scope=self.scope,
                                tx_off=s.offloads_off)
        return str(plan).splitlines()

    def mtu(self, uplink_mtu: int | None = None) -> int:
        if self.settings.mtu:
            return self.settings.mtu
        if not self._mtu:
            if uplink_mtu is None:
                with Netlink(self.host_netns) as nl:
                    up = nl.link(self.settings.uplink)
                    uplink_mtu = up.mtu if up is not None else 1500
            self._mtu = uplink_mtu or 1500
        return self._mtu

    def start(self) -> list[str]:
        s = self.settings
        changes: list[str] = []
        if s.takeover:
            plan, _ = tk.takeover(s.uplink, s.bridge, self.db, self.flows,
                                  datapath_type=s.datapath_type, trunks=s.trunks,
                                  mtu=self.mtu(), scope=self.scope, netns=self.host_netns,
                                  arp_timeout=s.gateway_timeout, tx_off=s.offloads_off)
            changes += [str(step) for step in plan]
        elif self.db.bridge(s.bridge) is None:
            raise DataplaneError(f"OVS bridge {s.bridge} does not exist ([vlan] takeover = "
                                 "false: make it first)")
        done = self.reprogram("agent start")
        changes.append(f"flows: {done.flows} in place, {done.removed} stale removed")
        self._stop.clear()
        self._watch = threading.Thread(target=self._watchdog, name="netd-vlan-flows",
                                       daemon=True)
        self._watch.start()
        return changes

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.join(timeout=5)
            self._watch = None
        if self._of is not None:
            self._of.close()
            self._of = None
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- flows from OVSDB -----------------------------------------------------------------

    def _security(self, port: OvsPort) -> F.PortSecurity | None:
        """A marked port's security from its external_ids (None: not a complete one)."""
        ids = port.external_ids
        if ids.get(MARK) != self.scope or OWNER not in ids or not port.ofport \
                or port.ofport < 0:
            return None  # not a container port of this agent (the trunk has no owner)
        if "ip" not in ids:
            return None  # prepared while the IPAM allocates: no flows, everything dropped
        try:
            ip = str(ipaddress.ip_interface(ids["ip"]).ip)
            allowed = tuple(a for a in ids.get(ALLOWED, "").split(",") if a)
            return F.PortSecurity(port.ofport, ids["attached-mac"], (ip,), ids.get(OWNER, ""),
                                  allowed)
        except (KeyError, ValueError) as exc:
            log.warning("vlan: port %s has unusable external_ids (%s): no flows", port.name,
                        exc)
            return None

    def desired_flows(self) -> list[F.Flow]:
        uplink = self.db.port(self.settings.uplink)
        ports = [sec for p in self.db.ports(self.settings.bridge)
                 if (sec := self._security(p)) is not None]
        return F.desired(uplink.ofport if uplink is not None else tk.UPLINK_OFPORT, ports)

    def reprogram(self, reason: str) -> _Reprogrammed:
        """Every flow from OVSDB: add (replacing in place), then remove what is stale."""
        t0 = time.monotonic()
        want = self.desired_flows()
        self.flows.apply(add=want)
        old = F.stale(self.flows.dump(F.NETD, F.COOKIE_MASK_NETD), want)
        if old:
            self.flows.apply(remove=old)
        done = _Reprogrammed(reason, time.time(), round(time.monotonic() - t0, 3), len(want),
                             len(old))
        self.reprogrammed.append(done)
        del self.reprogrammed[:-20]
        log.info("vlan: flows programmed (%s): %d in place, %d stale removed, %.3f s", reason,
                 done.flows, done.removed, done.seconds)
        return done

    def flows_intact(self) -> bool:
        """Whether the canary flow is there (a restarted ovs-vswitchd has no flows)."""
        try:
            return bool(self.flows.dump(F.CANARY_COOKIE, 0xFFFFFFFFFFFFFFFF))
        except OpenFlowError:
            return False

    def _watchdog(self) -> None:
        lost_at: float | None = None
        while not self._stop.wait(self.settings.flow_check_interval):
            try:
                if self.flows_intact():
                    lost_at = None
                    continue
                lost_at = lost_at or time.monotonic()
                self.reprogram("the flows were gone (ovs-vswitchd restarted?)")
                log.warning("vlan: flows restored %.1f s after they were found gone",
                            time.monotonic() - lost_at)
                lost_at = None
            except (DataplaneError, OSError) as exc:
                log.warning("vlan: cannot reprogram the flows yet: %s", exc)
            except Exception:  # the watchdog must outlive any bug: it is the only one
                log.exception("vlan: flow watchdog")

    # --- pools and endpoints -----------------------------------------------------------------

    def check_pool(self, pool: Mapping[str, Any]) -> None:
        """Refuse a pool this mode cannot serve, before anything is allocated or made."""
        self._check_vlan(pool.get("vlan"), f"pool {pool.get('name')!r}")

    def _check_vlan(self, vlan: int | None, name: str) -> None:
        if vlan is None:
            raise PoolNotUsable(f"{name} has no VLAN: the vlan mode puts each container on "
                                "its pool's VLAN (netctl pool create ... --vlan N)")
        if not self.settings.carries(int(vlan)):
            raise PoolNotUsable(f"{name} is on VLAN {vlan}, which the trunk "
                                f"{self.settings.uplink} does not carry ([vlan] trunks = "
                                f"{list(self.settings.trunks)})")

    def _names(self, ep: Endpoint) -> veth.Names:
        return veth.Names(ep.host_ifname, ep.ifname, ep.netns, ep.peer_ifname)

    def prepare(self, ep: Endpoint) -> veth.Veth:
        """The veth and its port while the IPAM allocates, without flows (fail_mode
        secure: everything from it is dropped): adding a port is ovs-vswitchd's slow
        part (a reconfiguration, 8-40 ms here). On the pool's VLAN when the agent knows
        it (attach then only adds the flows), else on the dead VLAN 4095 as Neutron
        wires a new port (nothing reaches it; attach moves it)."""
        tag = ep.vlan if ep.vlan is not None and self.settings.carries(ep.vlan) \
            else DEAD_VLAN
        pair = veth.create(self._names(ep), self.mark(ep), host=Netlink(self.host_netns),
                           mtu=self.mtu())
        pair.own_host = True
        ofport = None
        try:
            if self.settings.offloads_off:
                self._userspace_offloads(pair.names.container_end,
                                         ep.netns if ep.netns is not None else self.host_netns)
            ofport = self._ofport(ep.host_ifname)
            self.db.add_port(self.settings.bridge, ep.host_ifname, tag=tag,
                             ofport=ofport, external_ids=self._owner_ids(ep))
        except BaseException:
            self._undo(ep.host_ifname, None)
            pair.remove()
            pair.close()
            raise
        finally:
            if ofport is not None:
                self._release_ofport(ofport)
        return pair

    def _ofport(self, name: str) -> int:
        existing = self.db.port(name)
        if existing is not None:  # assigned, or asked for (a port just prepared)
            for n in (existing.ofport, existing.ofport_request):
                if n and n > 0:
                    return n
        with self._ofports.lock:
            used = self.db.ofports_in_use(self.settings.bridge) | self._ofports.reserved
            n = FIRST_OFPORT
            while n in used:
                n += 1
            self._ofports.reserved.add(n)
            return n

    def _release_ofport(self, n: int) -> None:
        with self._ofports.lock:
            self._ofports.reserved.discard(n)

    def _owner_ids(self, ep: Endpoint) -> dict[str, str]:
        owner = f"{ep.container_id}/{ep.ifname}"
        return {MARK: self.scope, OWNER: owner, "iface-id": owner}

    def external_ids(self, ep: Endpoint, attached: Attached) -> dict[str, str]:
        return {**self._owner_ids(ep), "attached-mac": attached.mac, "ip": attached.address,
                ALLOWED: ",".join(attached.allowed)}

    def security(self, ofport: int, attached: Attached) -> F.PortSecurity:
        return F.PortSecurity(ofport, attached.mac, (veth.interface(attached.address).ip
                                                     .compressed,),
                              extra=tuple(attached.allowed))

    def attach(self, ep: Endpoint, addressing: Addressing,
               prepared: Prepared | None = None) -> Attached:
        pair = prepared if isinstance(prepared, veth.Veth) else None
        if prepared is not None and pair is None:
            prepared.close()
        expected = self.expected(ep, addressing)
        try:
            self._check_vlan(addressing.vlan, f"the address {addressing.address}")
        except PoolNotUsable:
            if pair is not None:
                pair.remove()
                pair.close()
            raise
        if pair is None:
            pair = self.prepare(ep)
        elif pair.names != self._names(ep):
            pair.close()
            raise ValueError("the prepared veth is for another endpoint")
        ofport = self._ofport(ep.host_ifname)
        sec = self.security(ofport, expected)
        ids = self.external_ids(ep, expected)
        try:
            port = self.db.port(ep.host_ifname)
            if port is not None and port.bridge == self.settings.bridge \
                    and port.tag == addressing.vlan and port.ofport == ofport:
                # prepared on its VLAN: what the port carries changes nothing in the
                # datapath, so it is recorded while the flows go in (each a few ms)
                record = self._io.submit(self.db.set_port, ep.host_ifname,
                                         tag=addressing.vlan, external_ids=ids, wait=False)
                try:
                    self.flows.apply(add=sec.flows())
                finally:
                    record.result()
            else:  # flows first, then onto its VLAN (off the dead one, or added after a
                # failed attempt), waiting for ovs-vswitchd: the probe goes out next
                self.flows.apply(add=sec.flows())
                self.db.add_port(self.settings.bridge, ep.host_ifname, tag=addressing.vlan,
                                 ofport=ofport, external_ids=ids)
        except BaseException:
            self._undo(ep.host_ifname, ofport)
            pair.remove()
            pair.close()
            raise
        finally:
            self._release_ofport(ofport)
        try:
            done = veth.finish(pair, addressing.address, addressing.mac, addressing.gateway,
                               expected.pool_routes(), dad_timeout=self.dad_timeout)
        except BaseException:
            self._undo(ep.host_ifname, ofport)
            raise
        return Attached(ep.host_ifname, done.ifname, done.mac, expected.address,
                        expected.gateway, expected.routes, done.mtu, addressing.vlan,
                        {**expected.data, "ofport": str(ofport)}, expected.allowed)

    def _program_port(self, ofport: int, attached: Attached) -> None:
        """The port's flows as ``attached`` wants them: added in place first, then what
        no longer belongs (an allowed address taken away) removed."""
        want = self.security(ofport, attached).flows()
        self.flows.apply(add=want)
        old = F.stale(self.flows.dump(F.cookie(F.KIND_PORT, ofport), 0xFFFFFFFFFFFFFFFF), want)
        if old:
            self.flows.apply(remove=old)

    @staticmethod
    def _userspace_offloads(ifname: str, netns: str | None) -> None:
        """The container end on a userspace datapath without TSO: the kernel writes the
        checksums (nobody else would: TCP SYNs arrived with bad ones) and hands over
        frames of the MTU, not 64 KiB segments (GSO off: 1.2 against 0.94 Gbit/s measured
        here). With userspace TSO on, ovs-vswitchd does both: 5.9 Gbit/s."""
        set_tx_checksum(ifname, False, netns)
        set_gso(ifname, False, netns)

    def _undo(self, host_ifname: str, ofport: int | None) -> None:
        """The flows, then the OVSDB port of a port (a failed attach, a detach): in this
        order, so that its ofport is free for another ADD only once the removal of its
        flows is on the wire (the connection keeps the order). Waiting for neither:
        once OVSDB has committed, the port is gone for every reader (waiting for
        ovs-vswitchd cost a DEL 20-35 ms, measured); a port without flows drops all."""
        if ofport:
            with contextlib.suppress(OpenFlowError):
                self.flows.delete(F.cookie(F.KIND_PORT, ofport), wait=False)
        with contextlib.suppress(OvsdbError):
            self.db.del_port(host_ifname, wait=False)

    def expected(self, ep: Endpoint, addressing: Addressing) -> Attached:
        ifname = ep.peer_ifname if ep.handover and ep.peer_ifname else ep.ifname
        return Attached(ep.host_ifname, ifname, addressing.mac, addressing.address,
                        addressing.gateway, addressing.all_routes(),
                        addressing.mtu or 0, addressing.vlan, {"bridge": self.settings.bridge},
                        tuple(addressing.allowed))

    def _port_is(self, port: OvsPort | None, ep: Endpoint) -> bool:
        return (port is not None and port.scope == self.scope
                and port.owner == (ep.container_id, ep.ifname))

    def detach(self, ep: Endpoint, *, owner_only: bool = False) -> bool:
        port = self.db.port(ep.host_ifname)
        gone = False
        if port is not None and (not owner_only or self._port_is(port, ep)):
            self._undo(ep.host_ifname, port.ofport)
            gone = True
        with Netlink(self.host_netns) as host:
            link = host.link(ep.host_ifname)
            if link is not None:
                mark = veth.Mark.parse(link.alias)
                if owner_only and (mark is None or mark.scope != self.scope
                                   or mark.owner != ep.owner):
                    log.info("vlan: DEL of %s/%s: %s is not its (alias %r), left alone",
                             ep.container_id[:12], ep.ifname, ep.host_ifname, link.alias)
                    return gone
                gone = veth.detach(ep.host_ifname, host=host) or gone
        return gone

    def check(self, ep: Endpoint, attached: Attached) -> list[str]:
        problems: list[str] = []
        with Netlink(self.host_netns) as host:
            _, end_problems = veth.check_host_end(host, ep.host_ifname, None)
            problems += end_problems
        port = self.db.port(ep.host_ifname)
        if port is None or port.bridge != self.settings.bridge:
            problems.append(f"{ep.host_ifname} is not a port of {self.settings.bridge}")
        else:
            if port.tag != attached.vlan:
                problems.append(f"port {ep.host_ifname} has tag {port.tag}, expected "
                                f"{attached.vlan}")
            want_ids = self.external_ids(ep, attached)
            if {k: port.external_ids.get(k) for k in want_ids} != want_ids:
                problems.append(f"port {ep.host_ifname}'s external_ids are not what netd "
                                "set")
            if port.ofport and port.ofport > 0:
                want = {(f.key, f.cookie) for f in self.security(port.ofport, attached).flows()}
                try:
                    have = {(f.key, f.cookie) for f in self.flows.dump(
                        F.cookie(F.KIND_PORT, port.ofport), 0xFFFFFFFFFFFFFFFF)}
                except OpenFlowError as exc:
                    problems.append(f"cannot read the flows: {exc.message}")
                else:
                    if have != want:
                        problems.append(f"port {ep.host_ifname}'s flows: {len(want - have)} "
                                        f"missing, {len(have - want)} unexpected")
        if ep.handover:
            return problems
        return problems + veth.check_container(ep.netns or "", ep.ifname, attached.mac,
                                               attached.address, attached.gateway,
                                               attached.pool_routes())

    def repair(self, ep: Endpoint, attached: Attached) -> bool:
        if not self.check(ep, attached):
            return False
        with Netlink(self.host_netns) as host:
            link = host.link(ep.host_ifname)
        if link is None and ep.handover:
            log.warning("vlan: %s of %s is gone; its runtime must attach the container again",
                        ep.host_ifname, ep.container_id[:12])
            return False
        pair: veth.Veth | None = None
        if link is None:
            pair = veth.create(self._names(ep), self.mark(ep), host=self.host_netns,
                               mtu=attached.mtu or self.mtu(), mac=attached.mac)
        ofport = self._ofport(ep.host_ifname)
        try:
            self._program_port(ofport, attached)
            self.db.add_port(self.settings.bridge, ep.host_ifname, tag=attached.vlan,
                             ofport=ofport, external_ids=self.external_ids(ep, attached))
        finally:
            self._release_ofport(ofport)
        if pair is not None:
            if self.settings.offloads_off:
                self._userspace_offloads(ep.ifname, ep.netns)
            veth.finish(pair, attached.address, attached.mac, attached.gateway,
                        attached.pool_routes(), dad_timeout=0.0)
        else:
            with Netlink(self.host_netns) as host:
                host.set_up(ep.host_ifname)
        return True

    def owned(self) -> list[Owned]:
        return [Owned(link.name, mark, link.index)
                for link, mark in veth.scoped_host_ends(self.scope, host=self.host_netns)]

    def sweep(self, keep: Collection[str], *, hold: Hold | None = None) -> list[str]:
        """Marked host ends, OVSDB ports and flows of this scope that no record keeps."""
        with Netlink(self.host_netns) as host:
            removed = veth.sweep_host_ends(self.scope, keep, host=host, hold=hold)
        for port in self.db.ports(self.settings.bridge):
            if port.scope != self.scope or port.owner is None or port.name in keep:
                continue
            with hold(port.owner) if hold is not None else contextlib.nullcontext():
                if port.name in keep:
                    continue
                self._undo(port.name, port.ofport)
                removed.append(f"removed orphaned OVS port {port.name} "
                               f"({port.external_ids.get(OWNER)})")
        try:
            done = self.reprogram("sweep")  # flows of ports that are gone
            if done.removed:
                removed.append(f"removed {done.removed} stale flows")
        except DataplaneError as exc:
            log.warning("vlan: sweep could not check the flows: %s", exc)
        return removed

    # --- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        ports = [p for p in self.db.ports(self.settings.bridge)
                 if self._security(p) is not None]
        try:
            flows: int | None = len(self.flows.dump(F.NETD, F.COOKIE_MASK_NETD))
        except OpenFlowError:
            flows = None
        out = {"bridge": self.settings.bridge, "flows_intact": self.flows_intact(),
               "ports": len(ports), "reprogrammed": [vars(r) for r in self.reprogrammed[-5:]]}
        if flows is not None:
            out["flows"] = flows
        return out

    def gauges(self, status: Mapping[str, Any]) -> list[Gauge]:
        out = [Gauge("ovs_ports", "container ports on the bridge", (((), status["ports"]),)),
               Gauge("ovs_flows_intact", "1 when the bridge holds every rule netd wants",
                     (((), 1.0 if status.get("flows_intact") else 0.0),))]
        if "flows" in status:
            out.append(Gauge("ovs_flows", "netd's OpenFlow rules on the bridge",
                             (((), status["flows"]),)))
        return out


__all__ = ["VlanDriver", "VlanSettings", "parse_vlan_settings"]
