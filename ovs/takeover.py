"""The VLAN mode's host: ``bond0`` becomes a trunk port of ``ovs0``, the host moves inside.

The host's addresses and routes move from the uplink to the bridge's own
internal port (``ovs0``), which keeps the uplink's MAC (``other-config:hwaddr``)
so switches and ARP caches stay valid; the uplink becomes a trunk port
(every VLAN, or ``trunks``, and untagged frames for the host itself). Done
naively, the kernel keeps answering on the uplink as well as through ovs0 (it
still sees every frame the uplink receives: duplicate replies), so the uplink
first gets ``rp_filter=1``, ``arp_ignore=1`` and IPv6 off, and it joins the bridge
only once the host's addresses are off it (for a moment they are on both).

As in the L2 mode (:mod:`netd.dataplane.l2`), the takeover is a plan of
printable, idempotent steps (``netd agent --plan``), rolled back when the
default gateway does not answer ARP on ovs0 in time. The base flows go in
before the addresses move: the bridge is ``fail_mode=secure`` and forwards
nothing without them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from netd.dataplane.arp import gateway_answers_arp
from netd.dataplane.errors import DataplaneError, LinkNotFound, PlanError, TakeoverFailed
from netd.dataplane.ethtool import set_tx_checksum, tx_checksum
from netd.dataplane.model import Address, Link, Route, normalize_mac
from netd.dataplane.netlink import Netlink
from netd.dataplane.uplink import (
    Plan,
    SetSysctl,
    SetUp,
    Step,
    plan_move,
    plan_move_back,
    read_sysctl,
)
from netd.dataplane.uplink import default_gateway as uplink_default_gateway

from .flows import base_flows
from .openflow import OpenFlow
from .ovsdb import MARK, ROLE, OvsBridge, Ovsdb, OvsPort

log = logging.getLogger(__name__)

UPLINK_OFPORT = 1  # the trunk's ofport (ofport_request): flows name it before it exists


def uplink_sysctls(uplink: str) -> dict[str, str]:
    """What the uplink needs once the host lives on ovs0 (no second stack answering)."""
    return {f"net.ipv4.conf.{uplink}.rp_filter": "1",
            f"net.ipv4.conf.{uplink}.arp_ignore": "1",
            f"net.ipv6.conf.{uplink}.disable_ipv6": "1"}


# --- state -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VlanState:
    """A snapshot of the uplink, the bridge and the bridge's own port."""

    uplink: Link
    bridge_name: str
    bridge: OvsBridge | None
    uplink_port: OvsPort | None  # the uplink as a port of some bridge
    internal: Link | None  # the kernel's side of the bridge's own port
    uplink_addresses: tuple[Address, ...] = ()
    uplink_routes: tuple[Route, ...] = ()
    internal_addresses: tuple[Address, ...] = ()
    internal_routes: tuple[Route, ...] = ()
    sysctls: tuple[tuple[str, str | None], ...] = ()
    unsupported: tuple[str, ...] = ()
    internal_tx_off: bool = False  # the bridge's own port writes its checksums itself

    def __str__(self) -> str:
        lines = [str(self.uplink)]
        lines += [f"    inet {a}" for a in self.uplink_addresses]
        lines += [f"    route {r}" for r in self.uplink_routes]
        lines.append(f"{self.bridge_name}: " + ("absent" if self.bridge is None else
                                                f"OVS bridge ({self.bridge.datapath_type})"))
        lines += [f"    inet {a}" for a in self.internal_addresses]
        lines += [f"    route {r}" for r in self.internal_routes]
        lines += [f"    {k} = {v}" for k, v in self.sysctls]
        return "\n".join(lines)


def read_state(uplink: str, bridge: str, db: Ovsdb, *, netns: str | None = None) -> VlanState:
    with Netlink(netns) as nl:
        up = nl.link(uplink)
        if up is None:
            raise LinkNotFound(f"uplink {uplink} does not exist")
        internal = nl.link(bridge)
        routes = nl.routes(table=None)
        up_addrs = tuple(nl.addresses(uplink))
        up_routes = tuple(r for r in routes if r.ifname == uplink)
        in_addrs = tuple(nl.addresses(bridge)) if internal else ()
        in_routes = tuple(r for r in routes if r.ifname == bridge) if internal else ()
        unsupported = tuple(nl.multipath_routes(uplink))
    sysctls = tuple((k, read_sysctl(k, netns)) for k in uplink_sysctls(uplink))
    tx_off = internal is not None and not tx_checksum(bridge, netns)
    return VlanState(up, bridge, db.bridge(bridge), db.port(uplink), internal, up_addrs,
                     up_routes, in_addrs, in_routes, sysctls, unsupported, tx_off)


def default_gateway(state: VlanState) -> str | None:
    return uplink_default_gateway((*state.uplink_routes, *state.internal_routes))


# --- the steps OVS adds to netlink's ---------------------------------------------------


@dataclass(frozen=True)
class EnsureBridge:
    name: str
    datapath_type: str
    hwaddr: str
    mtu: int
    note: str = ""

    def __str__(self) -> str:
        return (f"ovs-vsctl --may-exist add-br {self.name} -- set bridge {self.name} "
                f"datapath_type={self.datapath_type} fail_mode=secure "
                f"protocols=OpenFlow10,OpenFlow13 other_config:hwaddr={self.hwaddr} "
                f"-- set port {self.name} trunks=0")


@dataclass(frozen=True)
class BaseFlows:
    bridge: str
    uplink_ofport: int
    note: str = ""

    def __str__(self) -> str:
        return (f"ovs-ofctl add-flows {self.bridge}  # table 0: in_port={self.uplink_ofport} "
                "and LOCAL -> NORMAL, the rest dropped (fail_mode=secure)")


@dataclass(frozen=True)
class AddTrunk:
    bridge: str
    uplink: str
    trunks: tuple[int, ...]
    scope: str
    note: str = ""

    def __str__(self) -> str:
        trunks = ",".join(map(str, (0, *self.trunks))) if self.trunks else "all VLANs"
        return (f"ovs-vsctl add-port {self.bridge} {self.uplink} -- set interface "
                f"{self.uplink} ofport_request={UPLINK_OFPORT}  # trunk: {trunks}")


@dataclass(frozen=True)
class DelTrunk:
    uplink: str
    note: str = ""

    def __str__(self) -> str:
        return f"ovs-vsctl del-port {self.uplink}"


@dataclass(frozen=True)
class TxChecksumOff:
    """``ethtool -K DEV tx off``: the userspace datapath leaves checksums to nobody."""

    ifname: str
    note: str = ""

    def __str__(self) -> str:
        return f"ethtool -K {self.ifname} tx off"

    def apply(self, nl: Netlink) -> None:
        set_tx_checksum(self.ifname, False, nl.netns)


@dataclass(frozen=True)
class DeleteBridge:
    name: str
    note: str = ""

    def __str__(self) -> str:
        return f"ovs-vsctl del-br {self.name}"


OvsStep = EnsureBridge | BaseFlows | AddTrunk | DelTrunk | DeleteBridge


def trunks_of(trunks: Sequence[int]) -> list[int]:
    """The uplink's OVSDB ``trunks``: empty (every VLAN) or the VLANs plus 0 (untagged)."""
    return [0, *sorted(set(trunks))] if trunks else []


def plan_takeover(state: VlanState, *, datapath_type: str, trunks: Sequence[int], mtu: int,
                  scope: str, tx_off: bool | None = None) -> Plan:
    """The changes that move the host onto ``ovs0`` with the uplink as its trunk (pure)."""
    up, bname = state.uplink, state.bridge_name
    if state.unsupported:
        raise PlanError(f"cannot take over {up.name}: " + "; ".join(state.unsupported)
                        + " (move these by hand first)")
    if up.master:
        raise PlanError(f"{up.name} is enslaved to {up.master}; take it out first")
    if state.uplink_port is not None and state.uplink_port.bridge != bname:
        raise PlanError(f"{up.name} is already a port of OVS bridge "
                        f"{state.uplink_port.bridge}, not {bname}")
    if state.bridge is not None and state.bridge.datapath_type != datapath_type:
        raise PlanError(f"OVS bridge {bname} has datapath_type {state.bridge.datapath_type}, "
                        f"not {datapath_type} ([vlan] datapath_type)")
    if not up.mac:
        raise PlanError(f"{up.name} has no MAC address")
    mac = normalize_mac(up.mac)
    want = uplink_sysctls(up.name)
    have = dict(state.sysctls)
    steps: list[Step | OvsStep] = []
    for key, value in want.items():
        if have.get(key) is not None and have.get(key) != value:
            steps.append(SetSysctl(key, value, note="so that only ovs0 answers for the host"))
    bridge_ok = (state.bridge is not None and state.bridge.fail_mode == "secure"
                 and state.bridge.other_config.get("hwaddr") == mac)
    if not bridge_ok:
        steps.append(EnsureBridge(bname, datapath_type, mac, mtu,
                                  note=f"{up.name}'s MAC, so switches and ARP caches stay "
                                       "valid"))
    steps.append(BaseFlows(bname, UPLINK_OFPORT))
    port_ok = (state.uplink_port is not None
               and list(state.uplink_port.trunks) == trunks_of(trunks)
               and state.uplink_port.ofport == UPLINK_OFPORT)
    if not up.up:
        steps.append(SetUp(up.name))
    if state.internal is None or not state.internal.up:
        steps.append(SetUp(bname, note="the host's own port"))
    if tx_off is None:  # the userspace datapath without TSO (see VlanSettings.offloads_off)
        tx_off = datapath_type == "netdev"
    if tx_off and not state.internal_tx_off:
        steps.append(TxChecksumOff(bname, note="TCP through the userspace datapath needs "
                                               "checksums written by the kernel"))
    steps += plan_move(up.name, bname, state.uplink_addresses, state.uplink_routes,
                       state.internal_addresses, state.internal_routes)
    # the uplink joins the bridge last: until then ovs0 hears nothing of the wire, and
    # once the addresses are off the uplink its own stack drops what it hears (strict
    # rp_filter, arp_ignore). With the trunk first, for the moment the address was on
    # both, a ping reached the kernel through both and was answered twice.
    if not port_ok:
        steps.append(AddTrunk(bname, up.name, tuple(trunks), scope))
    only_flows = all(isinstance(s, BaseFlows) for s in steps)
    return Plan(() if only_flows else tuple(steps),  # type: ignore[arg-type]
                title=f"take over {up.name} with OVS bridge {bname}")


def plan_rollback(before: VlanState, current: VlanState) -> Plan:
    """Back to ``before`` (pure): addresses and routes to the uplink, the uplink out of
    the bridge, the bridge removed when netd made it, the sysctls as they were."""
    up, bname = before.uplink, before.bridge_name
    steps: list[Step | OvsStep] = []
    steps += plan_move_back(up.name, bname, before.uplink_addresses, before.uplink_routes,
                            current.uplink_addresses, current.uplink_routes,
                            before.internal_addresses, before.internal_routes,
                            current.internal_addresses, current.internal_routes)
    if before.uplink_port is None and current.uplink_port is not None:
        steps.append(DelTrunk(up.name))
    if before.bridge is None and current.bridge is not None:
        steps.append(DeleteBridge(bname, note="netd created it"))
    now = dict(current.sysctls)
    for key, value in before.sysctls:
        if value is not None and now.get(key) != value:
            steps.append(SetSysctl(key, value))
    return Plan(tuple(steps), title=f"restore {up.name}")  # type: ignore[arg-type]


# --- apply ------------------------------------------------------------------------------


def apply_plan(plan: Plan, db: Ovsdb, flows: OpenFlow, *, netns: str | None = None) -> None:
    """Make each step: OVS ones through OVSDB and OpenFlow, the rest through netlink."""
    with Netlink(netns) as nl:
        for step in plan.steps:
            log.info("vlan: %s", step)
            try:
                _apply(step, nl, db, flows)
            except DataplaneError as exc:
                raise DataplaneError(f"step '{step}' failed: {exc.message}") from exc


def _apply(step: object, nl: Netlink, db: Ovsdb, flows: OpenFlow) -> None:
    if isinstance(step, EnsureBridge):
        db.ensure_bridge(step.name, datapath_type=step.datapath_type, hwaddr=step.hwaddr,
                         mtu=step.mtu)
    elif isinstance(step, BaseFlows):
        flows.apply(add=base_flows(step.uplink_ofport))
    elif isinstance(step, AddTrunk):
        db.add_port(step.bridge, step.uplink, trunks=trunks_of(step.trunks),
                    ofport=UPLINK_OFPORT, external_ids={MARK: step.scope, ROLE: "uplink"})
    elif isinstance(step, DelTrunk):
        db.del_port(step.uplink)
    elif isinstance(step, DeleteBridge):
        db.delete_bridge(step.name)
    else:
        step.apply(nl)  # type: ignore[attr-defined]


def rollback(snapshot: VlanState, db: Ovsdb, flows: OpenFlow, *,
             netns: str | None = None) -> Plan:
    current = read_state(snapshot.uplink.name, snapshot.bridge_name, db, netns=netns)
    plan = plan_rollback(snapshot, current)
    apply_plan(plan, db, flows, netns=netns)
    return plan


def takeover(uplink: str, bridge: str, db: Ovsdb, flows: OpenFlow, *, datapath_type: str,
             trunks: Sequence[int], mtu: int, scope: str, netns: str | None = None,
             gateway: str | None = None, arp_timeout: float = 10.0,
             tx_off: bool | None = None) -> tuple[Plan, VlanState]:
    """Take the uplink over; roll back when the gateway does not answer ARP on ovs0."""
    before = read_state(uplink, bridge, db, netns=netns)
    plan = plan_takeover(before, datapath_type=datapath_type, trunks=trunks, mtu=mtu,
                         scope=scope, tx_off=tx_off)
    gw = gateway or default_gateway(before)
    if plan:
        try:
            apply_plan(plan, db, flows, netns=netns)
        except Exception as exc:
            _restore(before, db, flows, netns, f"taking {uplink} over failed: {exc}")
        if gw is not None and not gateway_answers_arp(bridge, gw, arp_timeout, netns=netns):
            _restore(before, db, flows, netns, f"gateway {gw} did not answer ARP on {bridge} "
                                               f"within {arp_timeout:g} s after the takeover")
    return plan, before


def _restore(before: VlanState, db: Ovsdb, flows: OpenFlow, netns: str | None,
             why: str) -> NoReturn:
    log.error("vlan: %s; restoring the previous configuration", why)
    try:
        rollback(before, db, flows, netns=netns)
    except Exception as exc:
        raise TakeoverFailed(f"{why}; restoring the previous configuration ALSO failed: "
                             f"{exc}. Before the takeover:\n{before}") from exc
    raise TakeoverFailed(f"{why}; the previous configuration was restored")


__all__ = ["UPLINK_OFPORT", "VlanState", "apply_plan", "plan_rollback", "plan_takeover",
           "read_state", "rollback", "takeover", "trunks_of", "uplink_sysctls"]
