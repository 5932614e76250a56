"""The one ethtool setting netd needs: a device's transmit checksum offload.

On Open vSwitch's userspace datapath a container's TCP fails with the veth's
default offloads (the kernel leaves the checksum to "the hardware", which the
userspace datapath is not: SYNs arrive with bad checksums while ping works).
With transmit checksumming off on the container end the kernel writes every
checksum itself. ``SIOCETHTOOL`` with ``ETHTOOL_STXCSUM``, through an ioctl on
a socket made in the device's namespace (what ``ethtool -K DEV tx off`` does).
"""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct

from netd.dataplane.errors import DataplaneError
from netd.dataplane.netns import run_in_netns

SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM = 0x16
ETHTOOL_STXCSUM = 0x17
ETHTOOL_GGSO = 0x23
ETHTOOL_SGSO = 0x24


def _ethtool_value(ifname: str, cmd: int, value: int) -> int:
    buf = ctypes.create_string_buffer(struct.pack("II", cmd, value))
    ifreq = struct.pack("16sQ16x", ifname.encode(), ctypes.addressof(buf))  # struct ifreq
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)
    return int(struct.unpack("II", buf.raw[:8])[1])


def set_tx_checksum(ifname: str, on: bool, netns: str | None = None) -> None:
    """Transmit checksum offload of ``ifname`` (in ``netns``) on or off."""
    try:
        run_in_netns(netns, lambda: _ethtool_value(ifname, ETHTOOL_STXCSUM, int(on)))
    except OSError as exc:
        raise DataplaneError(f"cannot turn tx checksumming {'on' if on else 'off'} on "
                             f"{ifname}: {exc.strerror}") from None


def set_gso(ifname: str, on: bool, netns: str | None = None) -> None:
    """Generic segmentation offload of ``ifname`` on or off: off, the kernel hands the
    device frames of the MTU, never 64 KiB segments a userspace datapath cannot send."""
    try:
        run_in_netns(netns, lambda: _ethtool_value(ifname, ETHTOOL_SGSO, int(on)))
    except OSError as exc:
        raise DataplaneError(f"cannot turn gso {'on' if on else 'off'} on {ifname}: "
                             f"{exc.strerror}") from None


def tx_checksum(ifname: str, netns: str | None = None) -> bool:
    try:
        return bool(run_in_netns(netns, lambda: _ethtool_value(ifname, ETHTOOL_GTXCSUM, 0)))
    except OSError as exc:
        raise DataplaneError(f"cannot read tx checksumming of {ifname}: {exc.strerror}") \
            from None


__all__ = ["set_gso", "set_tx_checksum", "tx_checksum"]
