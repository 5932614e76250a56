"""Dataplane drivers: the kernel side of the host agent.

- :mod:`netd.dataplane.netlink`: :class:`~netd.dataplane.netlink.Netlink`, the
  rtnetlink handle everything uses (any network namespace, by name or path);
- :mod:`netd.dataplane.l2`: layer-2 mode (``br0`` over ``bond0``): takeover
  plan/apply/rollback, container attach/detach, ARP checks, FORWARD accept rule;
- :mod:`netd.dataplane.arp`: raw ARP frames and sockets;
- :mod:`netd.dataplane.model`: the value types (links, addresses, routes) and
  :data:`~netd.dataplane.model.RTPROT_NETD`, the route protocol marking netd's routes.

Nothing here runs at import time; importing does not touch the kernel.
"""

from netd.dataplane.model import RTPROT_NETD

__all__ = ["RTPROT_NETD"]
