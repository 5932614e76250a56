"""ARP over a raw AF_PACKET socket: probes, duplicate detection, announcements.

Frame building and parsing are pure (unit-tested); :class:`ArpSocket` sends and
receives on one interface of one network namespace; the exchanges every mode
uses are built on it: :func:`probe` / :func:`dad_probe` (RFC 5227 duplicate
address detection), :func:`send_gratuitous_arp`, :func:`arp_resolve` and
:func:`gateway_answers_arp` (the takeovers' check that the host still reaches
its gateway).
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from netd.dataplane.model import AF_INET
from netd.dataplane.netlink import Netlink
from netd.dataplane.netns import socket_in_netns

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
PACKET_OUTGOING = 4
BROADCAST = "ff:ff:ff:ff:ff:ff"
ZERO_MAC = "00:00:00:00:00:00"
ZERO_IP = "0.0.0.0"

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", "").replace("-", ""))


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


@dataclass(frozen=True)
class ArpPacket:
    op: int
    sender_mac: str
    sender_ip: str
    target_mac: str
    target_ip: str
    eth_src: str
    eth_dst: str

    @property
    def is_probe(self) -> bool:
        """An RFC 5227 probe: a request with sender IP 0.0.0.0."""
        return self.op == ARPOP_REQUEST and self.sender_ip == ZERO_IP


def build_arp(op: int, sender_mac: str, sender_ip: str, target_mac: str, target_ip: str,
              eth_dst: str = BROADCAST) -> bytes:
    """An Ethernet frame carrying one IPv4-over-Ethernet ARP packet (padded to 60 bytes)."""
    frame = _ETH.pack(mac_bytes(eth_dst), mac_bytes(sender_mac), ETH_P_ARP) + _ARP.pack(
        ARPHRD_ETHER, ETH_P_IP, 6, 4, op,
        mac_bytes(sender_mac), ipaddress.IPv4Address(sender_ip).packed,
        mac_bytes(target_mac), ipaddress.IPv4Address(target_ip).packed)
    return frame.ljust(60, b"\0")


def parse_arp(frame: bytes) -> ArpPacket | None:
    """The ARP packet in an Ethernet frame, or None when it is not IPv4-over-Ethernet ARP."""
    if len(frame) < _ETH.size + _ARP.size:
        return None
    dst, src, ethertype = _ETH.unpack_from(frame)
    if ethertype != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, _ETH.size)
    if (htype, ptype, hlen, plen) != (ARPHRD_ETHER, ETH_P_IP, 6, 4):
        return None
    return ArpPacket(op, mac_str(sha), str(ipaddress.IPv4Address(spa)), mac_str(tha),
                     str(ipaddress.IPv4Address(tpa)), mac_str(src), mac_str(dst))


def probe_frame(mac: str, ip: str) -> bytes:
    """RFC 5227 probe for ``ip``: who has ip? tell 0.0.0.0."""
    return build_arp(ARPOP_REQUEST, mac, ZERO_IP, ZERO_MAC, ip)


def request_frame(mac: str, sender_ip: str, target_ip: str) -> bytes:
    return build_arp(ARPOP_REQUEST, mac, sender_ip, ZERO_MAC, target_ip)


def announce_frame(mac: str, ip: str) -> bytes:
    """Gratuitous ARP (RFC 5227 announcement): a request with sender = target = ip."""
    return build_arp(ARPOP_REQUEST, mac, ip, ZERO_MAC, ip)


def conflict_mac(pkt: ArpPacket, ip: str, own_mac: str) -> str | None:
    """RFC 5227 2.1.1: the MAC of another host claiming ``ip`` (or probing for it), or None."""
    if pkt.sender_mac == own_mac:
        return None
    if pkt.sender_ip == ip:
        return pkt.sender_mac
    if pkt.is_probe and pkt.target_ip == ip:
        return pkt.sender_mac
    return None


_closer: queue.SimpleQueue[socket.socket] | None = None
_closer_lock = threading.Lock()


def close_later(sock: socket.socket) -> None:
    """Close a packet socket in the background.

    Closing an AF_PACKET socket waits for an RCU grace period
    (``synchronize_net()``, 10-15 ms here); nobody needs to wait for that.
    """
    global _closer
    with _closer_lock:
        if _closer is None:
            _closer = queue.SimpleQueue()
            threading.Thread(target=_close_loop, args=(_closer,), name="netd-arp-closer",
                             daemon=True).start()
    _closer.put(sock)


def _close_loop(q: queue.SimpleQueue[socket.socket]) -> None:
    while True:
        q.get().close()


def packet_socket() -> socket.socket:
    """An unbound raw packet socket (protocol 0: receives nothing until bound) here."""
    return socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)


class ArpSocket:
    """A raw ARP socket on one interface, opened inside ``netns``.

    ``listen=True`` binds it to the interface to receive ARP (its ``mac`` is
    read from the binding); ``listen=False`` only sends and needs ``mac``.
    The socket is made with protocol 0 and bound afterwards: that registers
    its receive hook once, without the grace period a re-bind costs.
    ``sock`` hands over such a socket (see :func:`packet_socket`), already
    made in ``netns``; the ArpSocket owns it from then on.
    Closing happens in the background (:func:`close_later`).
    """

    def __init__(self, ifname: str, netns: str | None = None, *, listen: bool = True,
                 mac: str | None = None, sock: socket.socket | None = None) -> None:
        self.ifname = ifname
        self.sock = sock if sock is not None else socket_in_netns(
            netns, socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            if listen:
                self.sock.bind((ifname, ETH_P_ARP))
                self.mac = mac_str(self.sock.getsockname()[4])
            elif mac is None:
                raise ValueError("a send-only ARP socket needs the interface's MAC")
            else:
                self.mac = mac
        except BaseException:
            close_later(self.sock)
            raise
        self.listening = listen

    def close(self) -> None:
        close_later(self.sock)

    def __enter__(self) -> ArpSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, frame: bytes) -> None:
        if self.listening:
            self.sock.send(frame)
        else:
            self.sock.sendto(frame, (self.ifname, ETH_P_ARP))

    def receive(self, deadline: float) -> ArpPacket | None:
        """The next incoming ARP packet before ``deadline`` (monotonic), or None."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            frame, addr = self.sock.recvfrom(2048)
            if addr[2] == PACKET_OUTGOING:
                continue
            pkt = parse_arp(frame)
            if pkt is not None:
                return pkt


# --------------------------------------------------------------------------- exchanges


def arp_resolve(ifname: str, ip: str, timeout: float, *, netns: str | None = None,
                source_ip: str | None = None, interval: float = 1.0) -> str | None:
    """ARP for ``ip`` on ``ifname`` (raw socket, bypassing the neighbour cache); its MAC or None.

    The request's sender is ``source_ip``, by default the interface's address in
    ``ip``'s subnet (0.0.0.0 when it has none). Any ARP packet from ``ip``
    counts as an answer. Repeats the request every ``interval`` seconds.
    """
    if source_ip is None:
        source_ip = _source_for(ifname, ip, netns)
    with ArpSocket(ifname, netns) as sock:
        deadline = time.monotonic() + timeout
        next_send = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            if now >= next_send:
                sock.send(request_frame(sock.mac, source_ip, ip))
                next_send = now + interval
            pkt = sock.receive(min(deadline, next_send))
            if pkt is not None and pkt.sender_ip == ip and pkt.sender_mac != sock.mac:
                return pkt.sender_mac


def _source_for(ifname: str, ip: str, netns: str | None) -> str:
    target = ipaddress.ip_address(ip)
    with Netlink(netns) as nl:
        for addr in nl.addresses(ifname, family=AF_INET):
            if target in addr.interface.network:
                return addr.ip
    return ZERO_IP


def gateway_answers_arp(ifname: str, gw_ip: str, timeout: float, *,
                        netns: str | None = None) -> bool:
    """True when ``gw_ip`` answers an ARP request sent on ``ifname`` within ``timeout`` s."""
    mac = arp_resolve(ifname, gw_ip, timeout, netns=netns, interval=min(1.0, timeout / 3))
    if mac is None:
        log.warning("arp: gateway %s did not answer ARP on %s within %g s", gw_ip, ifname, timeout)
    return mac is not None


def dad_probe(netns: str | None, ifname: str, ip: str, timeout: float, *,
              interval: float | None = None) -> str | None:
    """RFC 5227 duplicate address detection; the MAC of whoever holds ``ip``, or None.

    Sends ARP probes (sender IP 0.0.0.0) from ``ifname`` (up, without ``ip``)
    every ``interval`` seconds (default: two probes when ``timeout`` is at most
    0.1 s, else one every third of it, at least 50 ms apart) and listens for
    ``timeout`` seconds for a reply or a probe for the same address from
    another MAC.
    """
    with ArpSocket(ifname, netns) as sock:
        return probe(sock, ip, timeout, interval)


def probe(sock: ArpSocket, ip: str, timeout: float, interval: float | None = None,
          meanwhile: Callable[[], None] | None = None) -> str | None:
    """:func:`dad_probe` on a bound socket; ``meanwhile()`` runs after the first probe is out.

    Answers arriving while ``meanwhile`` runs wait in the socket's buffer, so
    the time it takes overlaps the probe's wait instead of adding to it.
    """
    if interval is None:  # short waits: two probes (one may be lost), else one every 1/3
        interval = timeout / 2 if timeout <= 0.1 else max(0.05, timeout / 3)
    deadline = time.monotonic() + timeout
    sock.send(probe_frame(sock.mac, ip))
    next_send = time.monotonic() + interval
    if meanwhile is not None:
        meanwhile()
    while True:
        now = time.monotonic()
        if now >= deadline:
            return None
        if now >= next_send:
            sock.send(probe_frame(sock.mac, ip))
            next_send = now + interval
        pkt = sock.receive(min(deadline, next_send))
        if pkt is not None:
            mac = conflict_mac(pkt, ip, sock.mac)
            if mac is not None:
                return mac


def send_gratuitous_arp(netns: str | None, ifname: str, ip: str, *, mac: str | None = None,
                        count: int = 1, interval: float = 0.0) -> None:
    """Announce ``ip`` from ``ifname`` (RFC 5227 announcement) so neighbours learn its MAC.

    With ``mac`` (the interface's), a send-only socket is used: no receive
    hook to register.
    """
    with ArpSocket(ifname, netns, listen=mac is None, mac=mac) as sock:
        for n in range(count):
            if n and interval:
                time.sleep(interval)
            sock.send(announce_frame(sock.mac, ip))
