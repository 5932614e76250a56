"""Layer-2 "bridge over bond0": the takeover of the host's uplink by ``br0``.

The host's uplink (``bond0``) is enslaved to a Linux bridge (``br0``) that takes
over the uplink's MAC, addresses and routes; containers are ports of ``br0``
(:mod:`netd.dataplane.l2driver`), so they sit in the hosts' own subnet.

Takeover is split so it can be shown before it is made and undone when it cuts
the host off:

* :func:`read_state` snapshots uplink and bridge (:class:`L2State`);
* :func:`plan_takeover` is pure: state in, :class:`Plan` out (empty when the
  host is already taken over), printable for ``netd agent --plan``;
* :func:`apply_takeover` makes the plan; :func:`rollback` restores a snapshot;
* :func:`takeover` does all of it and rolls back when the default gateway does
  not answer ARP on the bridge in time
  (:func:`~netd.dataplane.arp.gateway_answers_arp`).

:func:`ensure_bridge_forwarding` makes the bridge work on hosts where dockerd
set the iptables FORWARD policy to DROP and br_netfilter hands bridged frames
to iptables.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from typing import NoReturn

from netd.dataplane.arp import gateway_answers_arp
from netd.dataplane.errors import DataplaneError, LinkNotFound, PlanError, TakeoverFailed
from netd.dataplane.model import (
    Address,
    Link,
    Route,
    normalize_mac,
)
from netd.dataplane.netlink import Netlink
from netd.dataplane.netns import run_in_netns
from netd.dataplane.uplink import (
    AddAddress,
    DelAddress,
    DeleteLink,
    DelRoute,
    Plan,
    ReplaceRoute,
    SetMac,
    SetMaster,
    SetUp,
    Step,
    apply_plan,
    movable_addresses,
    movable_routes,
)
from netd.dataplane.uplink import default_gateway as uplink_default_gateway

log = logging.getLogger(__name__)

#: The comment on netd's iptables rules.
RULE_COMMENT = "netd: accept frames bridged on {bridge}"


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class L2State:
    """A snapshot of the uplink and the bridge (the bridge may not exist yet)."""

    uplink: Link
    bridge_name: str
    bridge: Link | None = None
    uplink_addresses: tuple[Address, ...] = ()
    uplink_routes: tuple[Route, ...] = ()
    bridge_addresses: tuple[Address, ...] = ()
    bridge_routes: tuple[Route, ...] = ()
    #: Things on the uplink that cannot be moved safely (multipath routes...).
    unsupported: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [str(self.uplink)]
        lines += [f"    inet {a}" for a in self.uplink_addresses]
        lines += [f"    route {r}" for r in self.uplink_routes]
        if self.bridge is None:
            lines.append(f"{self.bridge_name}: absent")
        else:
            lines.append(str(self.bridge))
            lines += [f"    inet {a}" for a in self.bridge_addresses]
            lines += [f"    route {r}" for r in self.bridge_routes]
        lines += [f"    unsupported: {u}" for u in self.unsupported]
        return "\n".join(lines)


def read_state(uplink: str, bridge: str, *, netns: str | None = None) -> L2State:
    """Snapshot ``uplink`` and ``bridge`` (addresses, routes of every table but local)."""
    with Netlink(netns) as nl:
        up = nl.link(uplink)
        if up is None:
            raise LinkNotFound(f"uplink {uplink} does not exist")
        br = nl.link(bridge)
        routes = nl.routes(table=None)
        return L2State(
            uplink=up,
            bridge_name=bridge,
            bridge=br,
            uplink_addresses=tuple(nl.addresses(uplink)),
            uplink_routes=tuple(r for r in routes if r.ifname == uplink),
            bridge_addresses=tuple(nl.addresses(bridge)) if br else (),
            bridge_routes=tuple(r for r in routes if r.ifname == bridge) if br else (),
            unsupported=tuple(nl.multipath_routes(uplink)),
        )


def default_gateway(state: L2State) -> str | None:
    """The IPv4 default gateway in the main table (uplink or bridge), lowest metric first."""
    return uplink_default_gateway((*state.uplink_routes, *state.bridge_routes))


# --------------------------------------------------------------------------- plan steps


@dataclass(frozen=True)
class CreateBridge:
    name: str
    mac: str
    mtu: int
    note: str = ""

    def __str__(self) -> str:
        return (f"ip link add {self.name} address {self.mac} mtu {self.mtu} up type bridge "
                "stp_state 0 forward_delay 0")

    def apply(self, nl: Netlink) -> None:
        if nl.link(self.name) is None:
            nl.create_bridge(self.name, mac=self.mac, mtu=self.mtu)


def plan_takeover(state: L2State) -> Plan:
    """The changes that make ``state.bridge_name`` own the uplink and its configuration.

    Pure. Order matters for a remote host: the bridge gets the addresses and
    routes before the uplink loses them, and each route is moved with one
    ``replace`` so there is no moment without it. Raises :class:`PlanError`
    when the takeover cannot be made safely.
    """
    up, bname = state.uplink, state.bridge_name
    if state.unsupported:
        raise PlanError(f"cannot take over {up.name}: " + "; ".join(state.unsupported)
                        + " (move these by hand first)")
    if up.master and up.master != bname:
        raise PlanError(f"{up.name} is already enslaved to {up.master}, not {bname}")
    if state.bridge is not None and state.bridge.kind != "bridge":
        raise PlanError(f"{bname} exists and is not a bridge (kind {state.bridge.kind})")
    if not up.mac:
        raise PlanError(f"{up.name} has no MAC address")
    mac = normalize_mac(up.mac)
    steps: list[Step] = []
    if state.bridge is None:
        steps.append(CreateBridge(bname, mac, up.mtu,
                                  note=f"{up.name}'s MAC, so switches and ARP caches stay valid"))
    else:
        if normalize_mac(state.bridge.mac or "00:00:00:00:00:00") != mac:
            steps.append(SetMac(bname, mac, note=f"keep {up.name}'s MAC on the bridge"))
        if not state.bridge.up:
            steps.append(SetUp(bname))
    if up.master != bname:
        steps.append(SetMaster(up.name, bname))
    if not up.up:
        steps.append(SetUp(up.name))

    addresses = movable_addresses(state.uplink_addresses)
    on_bridge = {a.cidr for a in state.bridge_addresses}
    for addr in addresses:
        if addr.cidr not in on_bridge:
            steps.append(AddAddress(bname, addr, note=f"from {up.name}"))

    routes = movable_routes(state.uplink_routes)
    bridge_keys = {r.key() for r in state.bridge_routes}
    for route in routes:
        if route.key() not in bridge_keys:
            steps.append(ReplaceRoute(route.on(bname), note=f"moves it from {up.name}"))
    for addr in addresses:
        steps.append(DelAddress(up.name, addr))
    for route in routes:
        if route.key() in bridge_keys:
            steps.append(DelRoute(route, note=f"already on {bname}"))
    return Plan(tuple(steps), title=f"take over {up.name} with {bname}")


def plan_rollback(before: L2State, current: L2State) -> Plan:
    """The changes that bring ``current`` back to ``before`` (a snapshot taken before a takeover).

    Pure; empty when nothing differs.
    """
    up, bname = before.uplink, before.bridge_name
    steps: list[Step] = []
    if current.uplink.master != up.master:
        steps.append(SetMaster(up.name, up.master))
    if current.uplink.up != up.up:
        steps.append(SetUp(up.name, up.up))
    have = {a.cidr for a in current.uplink_addresses}
    for addr in movable_addresses(before.uplink_addresses):
        if addr.cidr not in have:
            steps.append(AddAddress(up.name, addr))
    have_routes = {r.key() for r in current.uplink_routes}
    for route in movable_routes(before.uplink_routes):
        if route.key() not in have_routes:
            steps.append(ReplaceRoute(route))
    if current.bridge is not None:
        had = {a.cidr for a in before.bridge_addresses}
        for addr in movable_addresses(current.bridge_addresses):
            if addr.cidr not in had:
                steps.append(DelAddress(bname, addr))
        had_routes = {r.key() for r in before.bridge_routes}
        for route in movable_routes(current.bridge_routes):
            if route.key() not in had_routes:
                steps.append(DelRoute(route))
        if before.bridge is None:
            steps.append(DeleteLink(bname, note="netd created it"))
        else:
            if before.bridge.mac and before.bridge.mac != current.bridge.mac:
                steps.append(SetMac(bname, before.bridge.mac))
            if before.bridge.up != current.bridge.up:
                steps.append(SetUp(bname, before.bridge.up))
    return Plan(tuple(steps), title=f"restore {up.name}")


# --------------------------------------------------------------------------- apply


def apply_takeover(plan: Plan, *, netns: str | None = None) -> None:
    apply_plan(plan, netns=netns)


def rollback(snapshot: L2State, *, netns: str | None = None) -> Plan:
    """Bring the host back to ``snapshot``; returns what was changed (empty: nothing to do)."""
    current = read_state(snapshot.uplink.name, snapshot.bridge_name, netns=netns)
    plan = plan_rollback(snapshot, current)
    apply_plan(plan, netns=netns)
    return plan


@dataclass(frozen=True)
class TakeoverResult:
    before: L2State
    plan: Plan
    gateway: str | None
    changed: bool


def takeover(uplink: str, bridge: str, *, netns: str | None = None,
             gateway: str | None = None, arp_timeout: float = 10.0,
             accept_forwarding: bool = True) -> TakeoverResult:
    """Take the uplink over, check the gateway answers ARP on the bridge, roll back if not.

    ``gateway`` defaults to the IPv4 default route's gateway; with none, the
    check is skipped. Raises :class:`TakeoverFailed` (after restoring the
    snapshot) when applying fails or the gateway stays silent for ``arp_timeout``
    seconds. ``accept_forwarding`` also runs :func:`ensure_bridge_forwarding`.
    """
    before = read_state(uplink, bridge, netns=netns)
    plan = plan_takeover(before)
    gw = gateway or default_gateway(before)
    if plan:
        try:
            apply_takeover(plan, netns=netns)
        except Exception as exc:
            _restore(before, netns, f"applying the takeover of {uplink} failed: {exc}")
        if gw is not None and not gateway_answers_arp(bridge, gw, arp_timeout, netns=netns):
            _restore(before, netns, f"gateway {gw} did not answer ARP on {bridge} within "
                                    f"{arp_timeout:g} s after the takeover of {uplink}")
    if accept_forwarding:
        ensure_bridge_forwarding(bridge, netns=netns)
    return TakeoverResult(before, plan, gw, bool(plan))


def _restore(before: L2State, netns: str | None, why: str) -> NoReturn:
    log.error("l2: %s; restoring the previous configuration", why)
    try:
        rollback(before, netns=netns)
    except Exception as exc:
        raise TakeoverFailed(f"{why}; restoring the previous configuration ALSO failed: {exc}. "
                             f"Configuration before the takeover:\n{before}") from exc
    raise TakeoverFailed(f"{why}; the previous configuration was restored")


# --------------------------------------------------------------------------- iptables


def _forward_rule(bridge: str) -> list[str]:
    return ["FORWARD", "-i", bridge, "-o", bridge, "-m", "comment", "--comment",
            RULE_COMMENT.format(bridge=bridge), "-j", "ACCEPT"]


def _iptables(tool: str, args: list[str], netns: str | None) -> subprocess.CompletedProcess[str]:
    cmd = [tool, "-w", "5", *args]
    return run_in_netns(netns, lambda: subprocess.run(cmd, capture_output=True, text=True,
                                                       check=False, timeout=30))


def ensure_bridge_forwarding(bridge: str, *, netns: str | None = None) -> bool:
    """Accept frames bridged on ``bridge`` in the FORWARD chain (IPv4 and IPv6); idempotent.

    Needed when dockerd has set the FORWARD policy to DROP and br_netfilter
    passes bridged frames through iptables (``bridge-nf-call-iptables=1``).
    Rules are per network namespace: they go into ``netns`` (the host's).
    Inserts at the top one rule, commented "netd: ...", if it is missing;
    returns True when it inserted one.
    """
    changed = False
    rule = _forward_rule(bridge)
    for tool in ("iptables", "ip6tables"):
        path = shutil.which(tool)
        if path is None:
            log.warning("l2: %s not found; cannot make sure %s forwards bridged frames",
                        tool, bridge)
            continue
        if _iptables(path, ["-C", *rule], netns).returncode == 0:
            continue
        done = _iptables(path, ["-I", rule[0], "1", *rule[1:]], netns)
        if done.returncode != 0:
            raise DataplaneError(f"{tool}: cannot accept forwarding on {bridge}: "
                                 f"{done.stderr.strip()}")
        log.info("l2: %s: accepting frames bridged on %s", tool, bridge)
        changed = True
    return changed


def remove_bridge_forwarding(bridge: str, *, netns: str | None = None) -> bool:
    """Remove netd's FORWARD rules for ``bridge`` (every copy); True when one was removed."""
    removed = False
    rule = _forward_rule(bridge)
    for tool in ("iptables", "ip6tables"):
        path = shutil.which(tool)
        if path is None:
            continue
        while _iptables(path, ["-D", *rule], netns).returncode == 0:
            removed = True
    return removed


__all__ = [
    "AddAddress",
    "CreateBridge",
    "DelAddress",
    "DelRoute",
    "DeleteLink",
    "L2State",
    "Plan",
    "ReplaceRoute",
    "SetMac",
    "SetMaster",
    "SetUp",
    "Step",
    "TakeoverResult",
    "apply_plan",
    "apply_takeover",
    "default_gateway",
    "ensure_bridge_forwarding",
    "plan_rollback",
    "plan_takeover",
    "read_state",
    "remove_bridge_forwarding",
    "rollback",
    "takeover",
]
