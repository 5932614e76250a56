"""The L2 bridge driver: the agent's :class:`~netd.dataplane.driver.Dataplane` for ``mode = "l2"``.

A thin adapter from the agent's vocabulary (:class:`Plumbing`) onto the
functions of :mod:`netd.dataplane.l2`; it runs in the host's own namespace.
"""

from __future__ import annotations

import os

from netd.agent.config import L2Config
from netd.dataplane import l2
from netd.dataplane.driver import Plumbing
from netd.dataplane.errors import NetnsNotFound, TakeoverFailed
from netd.dataplane.netlink import Netlink, open_netns

__all__ = ["L2Driver", "TakeoverFailed"]

DEFAULT_ROUTES = {"0.0.0.0/0", "::/0"}


def _extra_routes(p: Plumbing) -> list[tuple[str, str | None]]:
    """Routes besides the default one (configure() adds that via the gateway)."""
    return [(dst, gw) for dst, gw in p.routes if dst not in DEFAULT_ROUTES]


class L2Driver:
    """Containers on ``br0``, which enslaves the uplink (``bond0``) and holds the host's address."""

    def __init__(self, cfg: L2Config) -> None:
        self.cfg = cfg

    # host
    def plan(self) -> list[str]:
        state = l2.read_state(self.cfg.uplink, self.cfg.bridge)
        plan = l2.plan_takeover(state)
        if not plan:
            return [f"# {self.cfg.bridge} already holds {self.cfg.uplink}: nothing to change"]
        return str(plan).splitlines()

    def start(self) -> list[str]:
        if not self.cfg.takeover:
            with Netlink() as nl:
                if nl.link(self.cfg.bridge) is None:
                    raise TakeoverFailed(f"bridge {self.cfg.bridge} does not exist and "
                                         "[l2] takeover = false")
            l2.ensure_bridge_forwarding(self.cfg.bridge)
            return []
        result = l2.takeover(self.cfg.uplink, self.cfg.bridge,
                             arp_timeout=self.cfg.gateway_timeout)
        return [str(step) for step in result.plan]

    # containers
    def prepare(self, netns: str, ifname: str, host_ifname: str,
                container_id: str) -> l2.PendingAttach:
        """The veth, before the address is known (the agent allocates meanwhile)."""
        return l2.prepare_attach(netns, ifname, host_ifname, self.cfg.bridge,
                                 container_id=container_id)

    def attach(self, p: Plumbing, dad_timeout: float,
               prepared: l2.PendingAttach | None = None) -> None:
        l2.attach(p.netns, p.ifname, p.host_ifname, self.cfg.bridge, p.address, p.mac,
                  p.gateway, _extra_routes(p), container_id=p.extra.get("container_id"),
                  dad_timeout=dad_timeout or None, mtu=p.mtu, pending=prepared)

    def remove(self, host_ifname: str, netns: str | None, ifname: str | None) -> None:
        l2.detach(host_ifname)

    def _attachment(self, p: Plumbing) -> l2.Attachment:
        return l2.Attachment(
            container_netns=p.netns, container_ifname=p.ifname, host_ifname=p.host_ifname,
            bridge=self.cfg.bridge, address=p.address, mac=p.mac, gateway=p.gateway,
            routes=tuple(_extra_routes(p)))

    def check(self, p: Plumbing) -> list[str]:
        return l2.check_attachment(self._attachment(p))

    def repair(self, p: Plumbing) -> bool:
        if not l2.check_attachment(self._attachment(p)):
            return False
        l2.plumb(p.netns, p.ifname, p.host_ifname, self.cfg.bridge, p.mac,
                 container_id=p.extra.get("container_id"), mtu=p.mtu)
        l2.configure(p.netns, p.ifname, p.address, p.gateway, _extra_routes(p))
        return True

    def owned_links(self) -> list[str]:
        return [link.name for link in l2.host_links()]

    def netns_exists(self, netns: str) -> bool:
        try:
            fd = open_netns(netns)
        except NetnsNotFound:
            return False
        os.close(fd)
        return True
