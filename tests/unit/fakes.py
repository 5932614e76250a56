"""Fakes for the agent's unit tests: the real IPAM API in-process, and a driver in memory.

The real components are exercised by tests/integration (namespaces, podman,
dockerd); these make the pipeline's rules fast to test, in addition.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from fastapi.testclient import TestClient

from netd.dataplane.driver import Addressing, Attached, Driver, Endpoint, Hold, Owned
from netd.dataplane.errors import (
    AddressConflict,
    DataplaneError,
    LinkExists,
    NetnsNotFound,
    NotAContainerNetns,
)
from netd.dataplane.veth import Mark
from netd.errors import Unavailable
from netd.ipam.api import create_app
from netd.ipam.client import Client
from netd.ipam.metrics import Metrics
from netd.ipam.service import IPAM, PoolSpec
from netd.ipam.store import open_store


class FlakyIpam:
    """The real client on the real API (in-process), which can be made unreachable."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.down = False
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if self.down:
                raise Unavailable("cannot reach IPAM server at http://ipam: down")
            return method(*args, **kwargs)

        return call


@contextmanager
def ipam_api(**pool: Any) -> Iterator[tuple[IPAM, FlakyIpam]]:
    """An IPAM with pool ``lab`` (198.18.0.0/24, .1-.49 reserved) and a client on its API."""
    store = open_store("sqlite://:memory:")
    service = IPAM(store)
    spec = {"name": "lab", "cidr": "198.18.0.0/24", "gateway": "198.18.0.1",
            "reserved": ["198.18.0.1-198.18.0.49"], **pool}
    service.create_pool(PoolSpec(**spec))
    try:
        with TestClient(create_app(service, None, Metrics()), base_url="http://ipam") as tc:
            client = Client("http://ipam", actor="agent:h1")
            client._http = tc  # the API in-process, through the real client
            yield service, FlakyIpam(client)
    finally:
        store.close()


def allocated(ipam: IPAM) -> dict[str, str]:
    """{ip: container id} of every allocation."""
    return {str(ipaddress.ip_address(a.ip)): a.container_id for a, _ in ipam.addresses()}


class FakeNamespaces(set[str]):
    """Namespaces a test pretends exist, and the host's own (which ADD must refuse)."""

    def __init__(self, names: Collection[str], host: Collection[str] = ("/proc/self/ns/net",)
                 ) -> None:
        super().__init__(names)
        self.host = set(host)

    def exists(self, netns: str) -> bool:
        return netns in self or netns in self.host

    def check(self, netns: str) -> None:
        if netns in self.host:
            raise NotAContainerNetns(f"CNI_NETNS {netns!r} is the host's own network namespace")
        if netns not in self:
            raise NetnsNotFound(f"network namespace {netns!r} does not exist")


class FakeVeth:
    """What FakeDriver.prepare makes; attach closes it."""

    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


class FakeDriver(Driver):
    """A dataplane in memory: endpoints by host ifname, a wire of foreign addresses."""

    mode = "l2"

    def __init__(self, scope: str = "br0", *, on_prepare: Callable[[Endpoint], None] | None
                 = None) -> None:
        super().__init__(None)
        self._scope = scope
        self.dad_timeout = 0.01
        self.links: dict[str, tuple[Endpoint, Mark]] = {}  # host ifname -> made, with mark
        self.configured: dict[str, Attached] = {}
        self.foreign: set[str] = set()  # host ifnames of someone else's (another scope)
        self.wire: dict[str, str] = {}  # ip -> MAC of a machine the IPAM does not know
        self.prepared: list[FakeVeth] = []
        self.fail_attach = False
        self.fail_prepare = False
        self.fail_repair: set[str] = set()
        self.on_prepare = on_prepare

    @classmethod
    def parse_settings(cls, table: Mapping[str, Any]) -> Any:
        return None

    @property
    def scope(self) -> str:
        return self._scope

    def plan(self) -> list[str]:
        return []

    def start(self) -> list[str]:
        return []

    def _make(self, ep: Endpoint) -> None:
        if ep.host_ifname in self.foreign:
            raise LinkExists(f"host interface {ep.host_ifname} already exists")
        self.links[ep.host_ifname] = (ep, self.mark(ep))

    def prepare(self, ep: Endpoint) -> FakeVeth:
        if self.on_prepare is not None:
            self.on_prepare(ep)
        if self.fail_prepare:
            raise DataplaneError("no veth today")
        self._make(ep)
        made = FakeVeth(ep)
        self.prepared.append(made)
        return made

    def attach(self, ep: Endpoint, addressing: Addressing, prepared: Any = None) -> Attached:
        if prepared is not None:
            assert prepared.ep == ep and not prepared.closed
            prepared.close()
        else:
            self._make(ep)
        holder = self.wire.get(addressing.ip)
        if holder:
            self.links.pop(ep.host_ifname, None)
            raise AddressConflict(addressing.ip, holder)
        if self.fail_attach:
            self.links.pop(ep.host_ifname, None)
            raise DataplaneError("RTNETLINK answers: kernel said no")
        attached = self.expected(ep, addressing)
        self.configured[ep.host_ifname] = attached
        return attached

    def expected(self, ep: Endpoint, addressing: Addressing) -> Attached:
        return Attached(ep.host_ifname, ep.peer_ifname if ep.handover and ep.peer_ifname
                        else ep.ifname, addressing.mac, addressing.address, addressing.gateway,
                        addressing.all_routes(), 1500, None, {"bridge": self._scope})

    def detach(self, ep: Endpoint, *, owner_only: bool = False) -> bool:
        made = self.links.get(ep.host_ifname)
        if made is None:
            return False
        if owner_only and made[1].owner != ep.owner:
            return False
        del self.links[ep.host_ifname]
        self.configured.pop(ep.host_ifname, None)
        return True

    def check(self, ep: Endpoint, attached: Attached) -> list[str]:
        if ep.host_ifname not in self.links:
            return [f"host interface {ep.host_ifname} is missing"]
        if self.configured.get(ep.host_ifname) != attached:
            return [f"{ep.ifname} lacks address {attached.address}"]
        return []

    def repair(self, ep: Endpoint, attached: Attached) -> bool:
        if ep.host_ifname in self.fail_repair:
            raise DataplaneError(f"cannot repair {ep.host_ifname} now")
        if not self.check(ep, attached):
            return False
        self.links[ep.host_ifname] = (ep, self.mark(ep))
        self.configured[ep.host_ifname] = attached
        return True

    def owned(self) -> list[Owned]:
        return [Owned(name, mark) for name, (_, mark) in self.links.items()]

    def sweep(self, keep: Collection[str], *, hold: Hold | None = None) -> list[str]:
        removed = []
        for name in list(self.links):
            if name not in keep:
                del self.links[name]
                self.configured.pop(name, None)
                removed.append(f"removed orphaned interface {name}")
        return removed


__all__ = ["FakeDriver", "FakeVeth", "FlakyIpam", "allocated", "ipam_api"]
