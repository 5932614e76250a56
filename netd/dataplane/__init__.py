"""The kernel side of the host agent: what every mode shares, and the L2 driver.

- :mod:`netd.dataplane.driver`: the driver interface (endpoint, addressing,
  what was attached) every mode implements; :mod:`netd.dataplane.registry`
  maps ``mode`` to its driver;
- :mod:`netd.dataplane.veth`: the endpoint core: a container's veth from
  creation to removal, its owner mark, the container end's address and routes;
- :mod:`netd.dataplane.netns`: network namespaces (open, enter, create, list);
- :mod:`netd.dataplane.netlink`: :class:`~netd.dataplane.netlink.Netlink`, the
  rtnetlink handle everything uses;
- :mod:`netd.dataplane.arp`: raw ARP: duplicate-address probes, gratuitous ARP,
  the gateway check;
- :mod:`netd.dataplane.l2`, :mod:`netd.dataplane.l2driver`: layer-2 mode
  (``br0`` over ``bond0``): the takeover, and the driver;
- :mod:`netd.dataplane.model`: the value types (links, addresses, routes) and
  :data:`~netd.dataplane.model.RTPROT_NETD`, the route protocol marking netd's routes.

Nothing here imports the agent or the integrations, and nothing runs at import
time; importing does not touch the kernel.
"""

from netd.dataplane.model import RTPROT_NETD

__all__ = ["RTPROT_NETD"]
