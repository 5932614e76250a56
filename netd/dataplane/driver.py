"""The interface between the agent and a dataplane (felix's "dataplane driver"), version 2.

The agent decides *what* a container gets (address, MAC, routes: the IPAM's
:class:`Addressing`); a driver makes it so on this host and says what it
configured (:class:`Attached`), from which the CNI and Docker results are
built. Each mode (L2 bridge, OVS VLAN, BGP) is one :class:`Driver`, found by
its mode name in :mod:`netd.dataplane.registry`.

A driver owns its ``agent.toml`` table (``[l2]``, ``[vlan]``, ``[bgp]``) and
every setting in it, the duplicate-address probe included; it speaks in
intents (attach this endpoint with this addressing), never in raw commands,
and everything it makes carries its mark so that :meth:`Driver.owned` and
:meth:`Driver.sweep` find its own objects and nobody else's.
"""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from netd.dataplane.veth import Mark, RouteSpec, default_dst, interface, peer_ifname_for


@dataclass(frozen=True)
class Endpoint:
    """One container interface, as the agent names it.

    ``netns`` is the container's network namespace (a name or a path); None
    means *handover*: the container end is left in the host's namespace as
    ``peer_ifname`` for a runtime that moves and configures it itself (Docker).
    """

    container_id: str
    ifname: str
    netns: str | None
    host_ifname: str
    peer_ifname: str | None = None
    #: the pool's VLAN when the agent knows it before the IPAM answers: a hint for
    #: :meth:`Driver.prepare` (the vlan mode puts the port on it at once)
    vlan: int | None = None

    @property
    def owner(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)

    @property
    def handover(self) -> bool:
        return self.netns is None

    @staticmethod
    def handed_over(container_id: str, ifname: str, host_ifname: str) -> Endpoint:
        return Endpoint(container_id, ifname, None, host_ifname,
                        peer_ifname_for(container_id, ifname))


@dataclass(frozen=True)
class Addressing:
    """What the IPAM gave the endpoint: its address, MAC and its pool's gateway and routes."""

    address: str  # ip/prefix, the pool's prefix
    mac: str
    gateway: str | None = None
    routes: tuple[RouteSpec, ...] = ()  # the pool's routes besides the default one
    vlan: int | None = None
    mtu: int | None = None
    #: addresses the container may also send from (a VRRP address: allowed-address-pairs)
    allowed: tuple[str, ...] = ()

    @property
    def ip(self) -> str:
        return str(interface(self.address).ip)

    def all_routes(self) -> tuple[RouteSpec, ...]:
        """Default route via the gateway (when there is one), then the pool's routes."""
        out: list[RouteSpec] = []
        if self.gateway:
            out.append((default_dst(interface(self.address)), self.gateway))
        out += [(dst, gw or self.gateway) for dst, gw in self.routes
                if ipaddress.ip_network(dst, strict=False).prefixlen]
        return tuple(out)


@dataclass(frozen=True)
class Attached:
    """What a driver configured for an endpoint; the agent records it and results are built
    from it.

    ``address``, ``gateway`` and ``routes`` are what the *container* has (in
    the BGP mode a /32 and a link-local gateway, not the pool's); ``routes``
    includes the default route. ``ifname`` is the container end's name where
    the driver left it (handover: the peer's name in the host's namespace).
    ``data`` is mode-specific (the bridge, the OVS port, the host route...);
    ``allowed`` the extra addresses the container may send from.
    """

    host_ifname: str
    ifname: str
    mac: str
    address: str
    gateway: str | None
    routes: tuple[RouteSpec, ...]
    mtu: int
    vlan: int | None = None
    data: Mapping[str, str] = field(default_factory=dict)
    allowed: tuple[str, ...] = ()

    def pool_routes(self) -> tuple[RouteSpec, ...]:
        """The routes besides the default one."""
        return tuple((d, g) for d, g in self.routes
                     if ipaddress.ip_network(d, strict=False).prefixlen)

    def to_dict(self) -> dict[str, Any]:
        return {"host_ifname": self.host_ifname, "ifname": self.ifname, "mac": self.mac,
                "address": self.address, "gateway": self.gateway,
                "routes": [list(r) for r in self.routes], "mtu": self.mtu, "vlan": self.vlan,
                "data": dict(self.data), "allowed": list(self.allowed)}

    @staticmethod
    def from_dict(doc: Mapping[str, Any]) -> Attached:
        return Attached(
            host_ifname=str(doc["host_ifname"]), ifname=str(doc["ifname"]), mac=str(doc["mac"]),
            address=str(doc["address"]), gateway=doc.get("gateway"),
            routes=tuple((str(d), None if g is None else str(g))
                         for d, g in doc.get("routes") or ()),
            mtu=int(doc.get("mtu") or 0), vlan=doc.get("vlan"),
            data={str(k): str(v) for k, v in (doc.get("data") or {}).items()},
            allowed=tuple(str(a) for a in doc.get("allowed") or ()))


@dataclass(frozen=True)
class Owned:
    """An endpoint object carrying this driver's mark (found by :meth:`Driver.owned`)."""

    host_ifname: str
    mark: Mark
    index: int = 0

    @property
    def owner(self) -> tuple[str, str]:
        return (self.mark.container_id, self.mark.ifname)


Hold = Callable[[tuple[str, str]], AbstractContextManager[None]]


class Prepared(Protocol):
    """What :meth:`Driver.prepare` made: handed to ``attach``, which closes it."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Gauge:
    """One gauge a mode reports: ``netd_agent_NAME``, per label values."""

    name: str
    help: str
    samples: tuple[tuple[tuple[str, ...], float], ...]
    labels: tuple[str, ...] = ()


class Driver(ABC):
    """One dataplane mode. Constructed with its parsed settings; touches nothing until called.

    Every call is idempotent. ``host_netns`` is the namespace the host's side
    lives in (None: this process's; tests and labs run drivers in a namespace).
    """

    #: the ``mode`` key of agent.toml this driver serves, and its table's name
    mode: ClassVar[str]
    #: the duplicate-address probe's wait in seconds (0: no probe), from the settings
    dad_timeout: float = 0.0
    #: whether :meth:`check_pool` wants to see each pool before an ADD allocates from it
    checks_pools: ClassVar[bool] = False
    #: whether :meth:`sync_blocks` wants the IPAM blocks this host owns (the BGP mode)
    follows_blocks: ClassVar[bool] = False
    #: whether containers get their address as a host route (/32) behind an on-link
    #: gateway outside any subnet (the BGP mode, as Calico does): runtimes that set the
    #: address themselves (Docker) must be given the /32, and there is no shared
    #: segment to announce the address on
    routed: ClassVar[bool] = False

    def __init__(self, settings: Any, *, host_netns: str | None = None) -> None:
        self.settings = settings
        self.host_netns = host_netns

    @classmethod
    @abstractmethod
    def parse_settings(cls, table: Mapping[str, Any]) -> Any:
        """The mode's agent.toml table -> its settings (pure; InvalidInput when wrong)."""

    @property
    @abstractmethod
    def scope(self) -> str:
        """What this driver's marks carry: tells its objects from another agent's."""

    # --- host -----------------------------------------------------------------------

    @abstractmethod
    def plan(self) -> list[str]:
        """The host changes :meth:`start` would make, as lines to print (``--plan``)."""

    @abstractmethod
    def start(self) -> list[str]:
        """Prepare the host (take the uplink over...); returns what it changed."""

    def stop(self) -> None:  # noqa: B027 (optional: most drivers open nothing to close)
        """Let go of what :meth:`start` opened (connections, threads); endpoints stay."""

    def status(self) -> dict[str, Any]:
        """What the mode reports in ``netd agent status`` (its own health)."""
        return {}

    def gauges(self, status: Mapping[str, Any]) -> list[Gauge]:
        """The mode's own Prometheus gauges, from a :meth:`status` just read (the agent's
        metrics add them as they are: it knows no mode)."""
        return []

    # --- endpoints ------------------------------------------------------------------

    def check_pool(self, pool: Mapping[str, Any]) -> None:  # noqa: B027 (optional)
        """Refuse (:class:`~netd.dataplane.errors.PoolNotUsable`) a pool this mode cannot
        serve, given the IPAM's pool document; called before anything is allocated
        when :attr:`checks_pools` is set."""

    def sync_blocks(self, blocks: Sequence[str]) -> list[str]:
        """Follow the IPAM blocks this host owns (CIDRs; the whole list each time) when
        :attr:`follows_blocks` is set; returns what changed."""
        return []

    def covers(self, ip: str) -> bool:
        """Whether ``ip`` lies in a block :meth:`sync_blocks` was last given."""
        return True

    def mark(self, ep: Endpoint) -> Mark:
        return Mark(self.scope, ep.container_id, ep.ifname)

    @abstractmethod
    def prepare(self, ep: Endpoint) -> Prepared | None:
        """Make what needs no address yet (the veth) while the IPAM allocates; None: nothing."""

    @abstractmethod
    def attach(self, ep: Endpoint, addressing: Addressing,
               prepared: Prepared | None = None) -> Attached:
        """Wire the endpoint; probe for the address first when the settings say so.

        Raises :class:`~netd.dataplane.errors.AddressConflict` (naming the MAC
        that answered) when another machine holds the address. A failed attach
        leaves nothing behind; ``prepared`` is consumed either way.
        """

    @abstractmethod
    def detach(self, ep: Endpoint, *, owner_only: bool = False) -> bool:
        """Remove the endpoint; False when it was already gone.

        ``owner_only``: remove only objects that carry this driver's mark for
        this endpoint's owner (a DEL the agent has no record of).
        """

    @abstractmethod
    def check(self, ep: Endpoint, attached: Attached) -> list[str]:
        """What is wrong with a live endpoint (empty when all is well)."""

    @abstractmethod
    def repair(self, ep: Endpoint, attached: Attached) -> bool:
        """Make a live endpoint whole again; True when something was fixed."""

    @abstractmethod
    def expected(self, ep: Endpoint, addressing: Addressing) -> Attached:
        """What :meth:`attach` configures for this addressing (pure; adoption uses it)."""

    @abstractmethod
    def owned(self) -> list[Owned]:
        """Endpoint objects on this host that carry this driver's mark."""

    @abstractmethod
    def sweep(self, keep: Collection[str], *, hold: Hold | None = None) -> list[str]:
        """Remove every object of this driver's whose endpoint (host ifname) is not in ``keep``.

        Covers every kind of object the mode makes (links, ports, flows,
        routes); returns what it removed. Only marked objects in this driver's
        scope are touched. ``hold(owner)``, when given, is held around the
        decision and the removal of each candidate (the agent's owner lock, so
        that a sweep while serving never races an ADD of that owner).
        """


__all__ = ["Addressing", "Attached", "Driver", "Endpoint", "Gauge", "Hold", "Owned", "Prepared"]
