"""Hand-made Ethernet frames, sent and watched on raw packet sockets in test namespaces.

What a hostile container would send (a gratuitous ARP for someone else's address,
an IPv4 packet from a stolen source, a router advertisement...) and a listener
that records what reaches the other side. Frame building is plain struct
packing; checksums are computed as the protocols define them.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from netd.dataplane.arp import ARPOP_REPLY, ARPOP_REQUEST, build_arp, mac_bytes
from netd.dataplane.netns import run_in_netns

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_OUTGOING = 4
BROADCAST = "ff:ff:ff:ff:ff:ff"


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ether(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return (mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype) + payload
            ).ljust(60, b"\0")


def garp(mac: str, ip: str) -> bytes:
    """Gratuitous ARP (a request with sender = target = ip) from ``mac``."""
    return build_arp(ARPOP_REQUEST, mac, ip, "00:00:00:00:00:00", ip)


def arp_reply(mac: str, sender_ip: str, target_mac: str, target_ip: str) -> bytes:
    return build_arp(ARPOP_REPLY, mac, sender_ip, target_mac, target_ip, eth_dst=target_mac)


def icmp_echo(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, ident: int = 0x4e44,
              payload: bytes = b"netd-guard-test") -> bytes:
    """An IPv4 ICMP echo request (with whatever source address is asked for)."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0x1234, 0, 64, 1, 0,
                         ipaddress.IPv4Address(src_ip).packed,
                         ipaddress.IPv4Address(dst_ip).packed)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return ether(dst_mac, src_mac, ETH_P_IP, header + icmp)


def _icmpv6(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, body: bytes) -> bytes:
    src, dst = ipaddress.IPv6Address(src_ip).packed, ipaddress.IPv6Address(dst_ip).packed
    pseudo = src + dst + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", _checksum(pseudo + body)) + body[4:]
    header = struct.pack("!IHBB", 0x60000000, len(body), 58, 255) + src + dst
    return ether(dst_mac, src_mac, ETH_P_IPV6, header + body)


def router_advert(src_mac: str, src_ip: str) -> bytes:
    """An ICMPv6 router advertisement (type 134) to all nodes, with a prefix of 2001:db8:66::/64."""
    body = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    prefix = struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0,
                         ipaddress.IPv6Address("2001:db8:66::").packed)
    return _icmpv6(src_mac, "33:33:00:00:00:01", src_ip, "ff02::1", body + prefix)


def neighbor_advert(src_mac: str, src_ip: str, target: str) -> bytes:
    """An unsolicited, overriding neighbour advertisement for ``target`` at ``src_mac``."""
    body = struct.pack("!BBHI16s", 136, 0, 0, 0x20000000,
                       ipaddress.IPv6Address(target).packed)
    option = struct.pack("!BB6s", 2, 1, mac_bytes(src_mac))
    return _icmpv6(src_mac, "33:33:00:00:00:01", src_ip, "ff02::1", body + option)


def send(netns: str, ifname: str, *frames: bytes) -> None:
    """Send raw frames from ``ifname`` inside ``netns``."""
    def work() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind((ifname, 0))
            for frame in frames:
                sock.send(frame)

    run_in_netns(netns, work)


@dataclass
class Watch:
    """Frames arriving on ``ifname`` in ``netns`` (not sent by it), kept while it runs."""

    netns: str
    ifname: str
    frames: list[bytes] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Watch:
        def loop() -> None:
            def inside() -> None:
                with socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                   socket.htons(ETH_P_ALL)) as sock:
                    sock.bind((self.ifname, 0))
                    sock.settimeout(0.05)
                    self._ready.set()
                    while not self._stop.is_set():
                        try:
                            frame, addr = sock.recvfrom(65535)
                        except TimeoutError:
                            continue
                        if addr[2] != PACKET_OUTGOING:
                            self.frames.append(frame)

            run_in_netns(self.netns, inside)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def matching(self, match: Callable[[bytes], bool], wait: float = 0.5) -> list[bytes]:
        time.sleep(wait)
        return [f for f in list(self.frames) if match(f)]


def is_icmp_from(src_ip: str) -> Callable[[bytes], bool]:
    packed = ipaddress.IPv4Address(src_ip).packed

    def match(f: bytes) -> bool:
        return (len(f) >= 34 and struct.unpack("!H", f[12:14])[0] == ETH_P_IP
                and f[23] == 1 and f[26:30] == packed)

    return match


def is_arp_claiming(ip: str) -> Callable[[bytes], bool]:
    packed = ipaddress.IPv4Address(ip).packed

    def match(f: bytes) -> bool:
        return len(f) >= 42 and f[12:14] == b"\x08\x06" and f[28:32] == packed

    return match


def is_icmpv6_type(kind: int) -> Callable[[bytes], bool]:
    def match(f: bytes) -> bool:
        return (len(f) >= 55 and struct.unpack("!H", f[12:14])[0] == ETH_P_IPV6
                and f[20] == 58 and f[54] == kind)

    return match


def from_mac(mac: str) -> Callable[[bytes], bool]:
    raw = mac_bytes(mac)
    return lambda f: f[6:12] == raw


def carries(payload: bytes) -> Callable[[bytes], bool]:
    return lambda f: payload in f


__all__ = ["Watch", "arp_reply", "carries", "ether", "from_mac", "garp", "icmp_echo",
           "is_arp_claiming", "is_icmp_from", "is_icmpv6_type", "neighbor_advert",
           "router_advert", "send"]
