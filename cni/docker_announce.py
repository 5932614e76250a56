"""The Docker driver's dataplane edge: veth pairs for endpoints, and their announcement.

Docker moves the interface a driver names in ``Join`` (``SrcName``) into the
container's namespace itself and configures it there (name ``ethN``, MAC,
address, routes). So for Docker both ends of the veth are made in the host's
namespace: our end (``ndd`` + 12 hex digits) on the bridge, up, with the owner
mark in its alias (``netd-docker:<endpoint id>``), and the end Docker takes
(``ndp`` + 12 hex digits). On ``Leave`` Docker moves its end back under its
old name; deleting our end removes both.

The marks differ from the CNI path's (``ndv``, ``netd:``) on purpose: each
reconciliation sweeps only its own links.

After ``Join`` Docker configures the container end; :func:`announce_when_up`
waits for the address to appear there and sends gratuitous ARP from inside the
container, so switches and neighbours learn the (new) MAC at once. The
container's namespace is Docker's ``SandboxKey``, a bind mount made in
dockerd's mount namespace: it is opened through ``/proc/<dockerd pid>/root``,
which works when the agent runs in another mount namespace (``ip netns exec``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time

from netd.dataplane.errors import DataplaneError, NetnsNotFound
from netd.dataplane.l2 import send_gratuitous_arp, wait_forwarding
from netd.dataplane.model import Link, normalize_mac
from netd.dataplane.netlink import Netlink

log = logging.getLogger("netd.agent.docker")

HOST_PREFIX = "ndd"
PEER_PREFIX = "ndp"
ALIAS_PREFIX = "netd-docker:"


def link_names(endpoint_id: str) -> tuple[str, str]:
    """(our end, Docker's end) for an endpoint: deterministic, 15 characters each."""
    digest = hashlib.sha256(endpoint_id.encode()).hexdigest()[:12]
    return HOST_PREFIX + digest, PEER_PREFIX + digest


def owner_alias(endpoint_id: str) -> str:
    return ALIAS_PREFIX + endpoint_id


def is_docker_link(link: Link) -> bool:
    """A veth end this driver made (by name prefix or owner alias)."""
    named = link.name.startswith((HOST_PREFIX, PEER_PREFIX)) and len(link.name) == 15
    return link.kind == "veth" and (named or (link.alias or "").startswith(ALIAS_PREFIX))


def create_pair(endpoint_id: str, bridge: str, mac: str) -> tuple[str, str]:
    """Make (idempotently) the endpoint's veth: our end on ``bridge`` and up, Docker's end
    with the endpoint's MAC and the bridge's MTU. Returns (our end, Docker's end).

    An existing pair is kept when Docker's end is still here (a repeated Join);
    a half (Docker's end already moved away or gone) is replaced.
    """
    host, peer = link_names(endpoint_id)
    mac = normalize_mac(mac)
    with Netlink() as nl:
        br = nl.link(bridge)
        if br is None:
            raise DataplaneError(f"bridge {bridge} does not exist")
        ours, theirs = nl.link(host), nl.link(peer)
        if ours is not None and theirs is not None and ours.master == bridge:
            nl.set_up(host)
            return host, peer
        for name in (host, peer):
            nl.delete_link(name)
        nl.create_veth(host, peer, peer_mac=mac, mtu=br.mtu, master=br.index, up=True)
        try:
            nl.set_alias(host, owner_alias(endpoint_id))
        except BaseException:
            nl.delete_link(host)
            raise
    return host, peer


def delete_pair(endpoint_id: str) -> bool:
    """Remove the endpoint's veth (whichever end is here); False when none was."""
    removed = False
    with Netlink() as nl:
        for name in link_names(endpoint_id):
            link = nl.link(name)
            if link is not None and is_docker_link(link):
                removed = nl.delete_link(name) or removed
    return removed


def host_end(endpoint_id: str, bridge: str) -> Link | None:
    """Our end when it exists and sits on ``bridge``."""
    host, _ = link_names(endpoint_id)
    with Netlink() as nl:
        link = nl.link(host)
    return link if link is not None and link.master == bridge else None


def docker_links() -> list[Link]:
    with Netlink() as nl:
        return [link for link in nl.links() if is_docker_link(link)]


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
    interface with ``mac``, then send ``count`` gratuitous ARPs from it. True when sent."""
    mac = normalize_mac(mac)
    deadline = time.monotonic() + timeout
    path = sandbox_path(sandbox, docker_pid)
    try:
        with Netlink(path) as nl:
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


class VethLinks:
    """The driver's :class:`~netd.agent.docker_driver.Links` for real."""

    def create_pair(self, endpoint_id: str, bridge: str, mac: str) -> tuple[str, str]:
        return create_pair(endpoint_id, bridge, mac)

    def delete_pair(self, endpoint_id: str) -> bool:
        return delete_pair(endpoint_id)

    def names(self, endpoint_id: str) -> tuple[str, str]:
        return link_names(endpoint_id)

    def present(self) -> list[str]:
        return [link.name for link in docker_links()]

    def remove(self, name: str) -> None:
        with Netlink() as nl:
            nl.delete_link(name)

    def announce(self, sandbox: str, docker_pid: int, host_ifname: str, mac: str, ip: str,
                 stop: threading.Event) -> bool:
        """Gratuitous ARP once the container's interface is configured and our bridge port
        forwards (frames sent before that would be dropped)."""
        wait_forwarding(host_ifname, 2.0)
        return announce_when_up(sandbox, docker_pid, mac, ip, stop=stop)
