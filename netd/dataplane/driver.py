"""The interface between the agent and a dataplane (felix's "dataplane driver").

The agent decides *what* a container gets (address, MAC, routes); a driver
makes it so on this host. Each mode (L2 bridge, OVS VLAN, BGP) is one driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Plumbing:
    """Everything a driver needs to wire one container interface."""

    netns: str  # path of the container's network namespace
    ifname: str  # interface name inside the container
    host_ifname: str  # our end on the host (carries netd's mark in its name)
    mac: str
    address: str  # "ip/prefix"
    gateway: str | None = None
    routes: tuple[tuple[str, str | None], ...] = ()  # (dst, gw); default route included
    vlan: int | None = None
    mtu: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


class Prepared(Protocol):
    """What :meth:`PreparingDataplane.prepare` made: handed to ``attach``, then closed."""

    def close(self) -> None: ...


class Dataplane(Protocol):
    """What the agent asks of a dataplane driver. All calls are idempotent."""

    def start(self) -> list[str]:
        """Prepare the host (e.g. take br0 over); returns what it changed."""

    def attach(self, p: Plumbing, dad_timeout: float) -> None:
        """Create, address and route the container interface, then announce it.

        With ``dad_timeout`` > 0 the wire is probed for the address first and
        :class:`~netd.dataplane.errors.AddressConflict` raised (naming the MAC
        that answered) when another machine holds it. A failed attach leaves
        nothing behind.
        """

    def remove(self, host_ifname: str, netns: str | None, ifname: str | None) -> None:
        """Remove the interface; success when it is already gone.

        May return as soon as the interface is gone from both namespaces, before
        the kernel has finished freeing it.
        """

    def check(self, p: Plumbing) -> list[str]:
        """Problems with an existing attachment (empty list when all is well)."""

    def repair(self, p: Plumbing) -> bool:
        """Make an existing attachment whole again; True when something was fixed."""

    def owned_links(self) -> list[str]:
        """Host interfaces that carry netd's mark (for the orphan sweep)."""

    def netns_exists(self, netns: str) -> bool: ...


class PreparingDataplane(Dataplane, Protocol):
    """A driver that can make the interface before the address is known.

    The agent then calls :meth:`prepare` while the IPAM allocates, and passes
    its result to ``attach(p, dad_timeout, prepared)``; when the ADD fails
    before that, it closes the result and removes the interface by name.
    """

    def prepare(self, netns: str, ifname: str, host_ifname: str,
                container_id: str) -> Prepared: ...

    def attach(self, p: Plumbing, dad_timeout: float,
               prepared: Prepared | None = None) -> None: ...
