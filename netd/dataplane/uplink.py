"""Moving a host's uplink configuration to another device: the steps every mode shares.

A takeover (``br0`` over ``bond0`` in the L2 mode, the internal port of ``ovs0``
in the VLAN mode) is a :class:`Plan` of small :class:`Step` values, each
printable as the command an operator would type (``netd agent --plan``) and
idempotent when applied. The steps here are netlink's; a mode adds its own
(creating its bridge) around them. :func:`plan_move` is the part every mode
shares: the uplink's addresses and routes onto the new device, each route
moved with one ``replace`` so there is no moment without it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from netd.dataplane.errors import DataplaneError
from netd.dataplane.model import AF_INET, RTPROT_KERNEL, RTPROT_RA, Address, Route
from netd.dataplane.netlink import Netlink
from netd.dataplane.netns import run_in_netns

log = logging.getLogger(__name__)


def default_gateway(routes: Iterable[Route]) -> str | None:
    """The IPv4 default gateway of the main table among ``routes``, lowest metric first:
    the address a takeover checks with ARP before it keeps the new layout."""
    candidates = [r for r in routes
                  if r.is_default and r.family == AF_INET and r.gateway and r.table == 254]
    candidates.sort(key=lambda r: r.metric or 0)
    return candidates[0].gateway if candidates else None


@dataclass(frozen=True)
class SetMac:
    ifname: str
    mac: str
    note: str = ""

    def __str__(self) -> str:
        return f"ip link set {self.ifname} address {self.mac}"

    def apply(self, nl: Netlink) -> None:
        nl.set_mac(self.ifname, self.mac)


@dataclass(frozen=True)
class SetUp:
    ifname: str
    up: bool = True
    note: str = ""

    def __str__(self) -> str:
        return f"ip link set {self.ifname} {'up' if self.up else 'down'}"

    def apply(self, nl: Netlink) -> None:
        if self.up:
            nl.set_up(self.ifname)
        else:
            nl.set_down(self.ifname)


@dataclass(frozen=True)
class SetMaster:
    ifname: str
    master: str | None
    note: str = ""

    def __str__(self) -> str:
        if self.master:
            return f"ip link set {self.ifname} master {self.master}"
        return f"ip link set {self.ifname} nomaster"

    def apply(self, nl: Netlink) -> None:
        nl.set_master(self.ifname, self.master)


@dataclass(frozen=True)
class AddAddress:
    ifname: str
    address: Address
    note: str = ""

    def __str__(self) -> str:
        return f"ip addr add {self.address} dev {self.ifname}"

    def apply(self, nl: Netlink) -> None:
        nl.add_address(self.ifname, self.address)


@dataclass(frozen=True)
class DelAddress:
    ifname: str
    address: Address
    note: str = ""

    def __str__(self) -> str:
        return f"ip addr del {self.address.cidr} dev {self.ifname}"

    def apply(self, nl: Netlink) -> None:
        nl.del_address(self.ifname, self.address)


@dataclass(frozen=True)
class ReplaceRoute:
    route: Route
    note: str = ""

    def __str__(self) -> str:
        return f"ip route replace {self.route}"

    def apply(self, nl: Netlink) -> None:
        nl.replace_route(self.route)


@dataclass(frozen=True)
class DelRoute:
    route: Route
    note: str = ""

    def __str__(self) -> str:
        return f"ip route del {self.route}"

    def apply(self, nl: Netlink) -> None:
        nl.del_route(self.route)


@dataclass(frozen=True)
class DeleteLink:
    ifname: str
    note: str = ""

    def __str__(self) -> str:
        return f"ip link del {self.ifname}"

    def apply(self, nl: Netlink) -> None:
        nl.delete_link(self.ifname)


class Step(Protocol):
    """One change of a plan: printable as the command an operator would type."""

    @property
    def note(self) -> str: ...

    def __str__(self) -> str: ...

    def apply(self, nl: Netlink) -> None: ...


@dataclass(frozen=True)
class Plan:
    """An ordered list of changes; ``str(plan)`` is what ``netd agent --plan`` prints."""

    steps: tuple[Step, ...] = ()
    title: str = ""

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __str__(self) -> str:
        if not self.steps:
            return f"{self.title}: nothing to change" if self.title else "nothing to change"
        width = min(60, max(len(str(s)) for s in self.steps))
        lines = [f"{self.title}:"] if self.title else []
        for n, step in enumerate(self.steps, 1):
            text = str(step)
            if step.note:
                text = f"{text:<{width}}  # {step.note}"
            lines.append(f"{n:3}. {text}")
        return "\n".join(lines)


def movable_addresses(addresses: Iterable[Address]) -> list[Address]:
    # IPv6 link-local addresses belong to the device (the bridge makes its own,
    # identical since it carries the same MAC).
    return [a for a in addresses if not a.link_local]


def movable_routes(routes: Iterable[Route]) -> list[Route]:
    """Routes to move, in an order the kernel accepts: device routes before routes via gateways.

    Kernel routes follow their address; RA routes are relearned on the bridge.
    """
    keep = [r for r in routes if r.proto not in (RTPROT_KERNEL, RTPROT_RA)
            and not (r.family != AF_INET and r.network.is_link_local)]
    return sorted(keep, key=lambda r: (r.gateway is not None, r.is_default))


@dataclass(frozen=True)
class SetSysctl:
    """A per-namespace sysctl (``net.ipv4.conf.bond0.arp_ignore``) written in the namespace."""

    key: str
    value: str
    note: str = ""

    def __str__(self) -> str:
        return f"sysctl -w {self.key}={self.value}"

    def apply(self, nl: Netlink) -> None:
        write_sysctl(self.key, self.value, nl.netns)


def sysctl_path(key: str) -> str:
    if not all(part and part.replace("-", "_").replace("_", "a").isalnum()
               for part in key.split(".")):
        raise ValueError(f"bad sysctl name {key!r}")
    return "/proc/sys/" + key.replace(".", "/")


def read_sysctl(key: str, netns: str | None = None) -> str | None:
    """A sysctl of ``netns`` (None when it does not exist, e.g. IPv6 off)."""
    def read() -> str | None:
        try:
            with open(sysctl_path(key)) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None
    return run_in_netns(netns, read)


def write_sysctl(key: str, value: str, netns: str | None = None) -> None:
    def write() -> None:
        with open(sysctl_path(key), "w") as f:
            f.write(value)
    try:
        run_in_netns(netns, write)
    except OSError as exc:
        raise DataplaneError(f"cannot set {key}={value}: {exc.strerror}") from None


def plan_move(uplink: str, target: str, uplink_addresses: Sequence[Address],
              uplink_routes: Sequence[Route], target_addresses: Sequence[Address] = (),
              target_routes: Sequence[Route] = ()) -> list[Step]:
    """The uplink's addresses and routes onto ``target`` (pure): first added there, then
    taken off the uplink, each route moved with one ``replace``."""
    steps: list[Step] = []
    addresses = movable_addresses(uplink_addresses)
    on_target = {a.cidr for a in target_addresses}
    for addr in addresses:
        if addr.cidr not in on_target:
            steps.append(AddAddress(target, addr, note=f"from {uplink}"))
    routes = movable_routes(uplink_routes)
    target_keys = {r.key() for r in target_routes}
    for route in routes:
        if route.key() not in target_keys:
            steps.append(ReplaceRoute(route.on(target), note=f"moves it from {uplink}"))
    for addr in addresses:
        steps.append(DelAddress(uplink, addr))
    for route in routes:
        if route.key() in target_keys:
            steps.append(DelRoute(route, note=f"already on {target}"))
    return steps


def plan_move_back(uplink: str, target: str, before_uplink_addresses: Sequence[Address],
                   before_uplink_routes: Sequence[Route], uplink_addresses: Sequence[Address],
                   uplink_routes: Sequence[Route], before_target_addresses: Sequence[Address],
                   before_target_routes: Sequence[Route], target_addresses: Sequence[Address],
                   target_routes: Sequence[Route]) -> list[Step]:
    """Undo :func:`plan_move` (pure): what the uplink had, back; what ``target`` gained, off."""
    steps: list[Step] = []
    have = {a.cidr for a in uplink_addresses}
    for addr in movable_addresses(before_uplink_addresses):
        if addr.cidr not in have:
            steps.append(AddAddress(uplink, addr))
    have_routes = {r.key() for r in uplink_routes}
    for route in movable_routes(before_uplink_routes):
        if route.key() not in have_routes:
            steps.append(ReplaceRoute(route))
    had = {a.cidr for a in before_target_addresses}
    for addr in movable_addresses(target_addresses):
        if addr.cidr not in had:
            steps.append(DelAddress(target, addr))
    had_routes = {r.key() for r in before_target_routes}
    for route in movable_routes(target_routes):
        if route.key() not in had_routes:
            steps.append(DelRoute(route))
    return steps


def apply_plan(plan: Plan, *, netns: str | None = None) -> None:
    """Make each step, in order. Steps are idempotent; a failure stops and raises."""
    with Netlink(netns) as nl:
        for step in plan.steps:
            log.info("l2: %s", step)
            try:
                step.apply(nl)
            except DataplaneError as exc:
                raise DataplaneError(f"step '{step}' failed: {exc.message}") from exc


__all__ = ["AddAddress", "DelAddress", "DelRoute", "DeleteLink", "Plan", "ReplaceRoute",
           "SetMac", "SetMaster", "SetSysctl", "SetUp", "Step", "apply_plan",
           "default_gateway", "movable_addresses", "movable_routes", "plan_move",
           "plan_move_back", "read_sysctl", "write_sysctl"]
