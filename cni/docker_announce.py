"""After Docker's ``Join``: announce the container once Docker has configured it.

Docker moves the container end a driver hands it (``Join``'s ``SrcName``) into
the container's namespace itself and configures it there (name ``ethN``, MAC,
address, routes). :func:`announce_when_up` waits for the address to appear
there and sends gratuitous ARP from inside the container, so switches and
neighbours learn the (new) MAC at once. The container's namespace is Docker's
``SandboxKey``, a bind mount made in dockerd's mount namespace: it is opened
through ``/proc/<dockerd pid>/root``, which works when the agent runs in
another mount namespace (``ip netns exec``).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from netd.dataplane.arp import send_gratuitous_arp
from netd.dataplane.errors import DataplaneError, NetnsNotFound
from netd.dataplane.model import normalize_mac
from netd.dataplane.netlink import Netlink

log = logging.getLogger("netd.cni.docker")


def sandbox_path(sandbox: str, docker_pid: int = 0) -> str:
    """The container namespace file as this process can open it.

    Docker bind-mounts it in its own mount namespace; through
    ``/proc/<dockerd>/root`` it is found from any other one.
    """
    if docker_pid > 0:
        via = f"/proc/{docker_pid}/root{sandbox}"
        if os.path.exists(via):
            return via
    return sandbox


def _configured(nl: Netlink, mac: str, ip: str) -> str | None:
    """The interface carrying ``mac`` once it is up with ``ip``; else None."""
    for link in nl.links():
        if (link.mac and normalize_mac(link.mac) == mac and link.up
                and any(a.cidr.split("/")[0] == ip for a in nl.addresses(link.name))):
            return link.name
    return None


def announce_when_up(sandbox: str, docker_pid: int, mac: str, ip: str, *,
                     timeout: float = 10.0, count: int = 2, interval: float = 0.2,
                     stop: threading.Event | None = None) -> bool:
    """Wait (up to ``timeout``) until Docker has configured ``ip`` on the container's
    interface with ``mac``, then send ``count`` gratuitous ARPs from it. True when sent.

    The namespace itself may not exist yet: Docker joins the endpoint before it
    starts the container, whose runtime hook then bind-mounts the container's
    namespace at the sandbox key.
    """
    mac = normalize_mac(mac)
    deadline = time.monotonic() + timeout
    nl = None
    while nl is None:
        path = sandbox_path(sandbox, docker_pid)
        try:
            nl = Netlink(path)
        except (NetnsNotFound, OSError) as exc:  # not there yet, or not yet a namespace
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                log.warning("docker: no namespace at %s within %g s (%s); no gratuitous ARP "
                            "for %s", sandbox, timeout, exc, ip)
                return False
            time.sleep(0.02)
    try:
        with nl:
            while True:
                ifname = _configured(nl, mac, ip)
                if ifname is not None:
                    break
                if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                    log.warning("docker: %s did not come up in %s within %g s; no gratuitous "
                                "ARP", ip, sandbox, timeout)
                    return False
                time.sleep(0.02)
        send_gratuitous_arp(path, ifname, ip, mac=mac, count=count, interval=interval)
    except (NetnsNotFound, DataplaneError, OSError) as exc:
        log.warning("docker: gratuitous ARP for %s in %s failed: %s", ip, sandbox, exc)
        return False
    log.debug("docker: announced %s (%s) from %s in %s", ip, mac, ifname, sandbox)
    return True


__all__ = ["announce_when_up", "sandbox_path"]
