"""Network namespaces: the one place that opens, enters, creates and lists them.

A namespace is named the way every caller names it: a name (``/run/netns/NAME``,
what ``ip netns add`` makes) or a path (anything with a ``/``: ``/proc/PID/ns/net``,
a CNI ``CNI_NETNS``, Docker's ``SandboxKey``). ``None`` always means "the caller's
own namespace".

Namespaces are entered the way Go CNI plugins do it: a short-lived thread calls
``setns(2)`` (network namespaces are per thread), does its work and ends. Sockets
it made stay in that namespace; processes it starts start there. This costs
about a millisecond and forks nothing, so it is safe in a threaded daemon.
pyroute2 creates and removes named namespaces (it bind-mounts them like ``ip``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from pyroute2 import netns as pr_netns

from netd.dataplane.errors import NetnsNotFound, NotAContainerNetns

T = TypeVar("T")

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(netns: str) -> str:
    """A namespace name (``/run/netns/NAME``) or a path (anything with a ``/``) -> its file."""
    return netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)


def open_netns(netns: str) -> int:
    """An O_RDONLY fd on the namespace file; :class:`NetnsNotFound` when it is gone."""
    path = netns_path(netns)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NetnsNotFound(f"network namespace {netns!r} does not exist ({path})") from exc


NS_GET_NSTYPE = 0xB703  # linux/nsfs.h: _IO(0xb7, 0x3)


def _ident(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_container_netns(netns: str, host_netns: str | None = None) -> None:
    """Refuse what is not a container's network namespace, before anything is made.

    :class:`NetnsNotFound` when it does not exist (CNI error 3);
    :class:`NotAContainerNetns` (error 4) for a relative path, a file or a
    directory, a namespace of another kind, and for the host's own network
    namespace (this process's, ``host_netns``, or init's): plumbing "a
    container" there would put an interface and routes into the host itself.
    """
    if "/" in netns and not netns.startswith("/"):
        raise NotAContainerNetns(f"CNI_NETNS {netns!r} is a relative path; give an absolute "
                                 "path or a name in /run/netns")
    path = netns_path(netns)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NetnsNotFound(f"network namespace {netns!r} does not exist ({path})") from exc
    except OSError as exc:
        raise NotAContainerNetns(f"CNI_NETNS {netns!r} cannot be opened: "
                                 f"{exc.strerror}") from None
    try:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            raise NotAContainerNetns(f"CNI_NETNS {netns!r} is not a namespace (a file, a "
                                     "directory or a device)") from None
        if kind != CLONE_NEWNET:
            raise NotAContainerNetns(f"CNI_NETNS {netns!r} is a namespace of another kind, "
                                     "not a network namespace")
        st = os.fstat(fd)
    finally:
        os.close(fd)
    own = {_ident("/proc/self/ns/net"), _ident("/proc/1/ns/net")}
    if host_netns is not None:
        own.add(_ident(netns_path(host_netns)))
    if (st.st_dev, st.st_ino) in own:
        raise NotAContainerNetns(f"CNI_NETNS {netns!r} is the host's own network namespace, "
                                 "not a container's")


def netns_exists(netns: str) -> bool:
    """Whether the namespace can be opened (a bind mount or a live process's)."""
    try:
        fd = open_netns(netns)
    except NetnsNotFound:
        return False
    os.close(fd)
    return True


def same_netns(a: str | None, b: str | None) -> bool:
    """Whether two namespaces (None: ours) are the same one (same device and inode)."""
    def ident(ns: str | None) -> tuple[int, int] | None:
        path = "/proc/self/ns/net" if ns is None else netns_path(ns)
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    ia, ib = ident(a), ident(b)
    return ia is not None and ia == ib


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn()`` inside the namespace (in a throw-away thread) and return its result.

    Sockets ``fn`` creates stay in that namespace; processes it starts with
    :mod:`subprocess` start there too. ``netns=None`` runs ``fn`` right here.
    """
    if netns is None:
        return fn()
    fd = open_netns(netns)
    try:
        return run_in_netns_fd(fd, fn, netns)
    finally:
        os.close(fd)


def run_in_netns_fd(fd: int, fn: Callable[[], T], name: str = "") -> T:
    """:func:`run_in_netns` for a namespace given by an open descriptor (not closed here)."""
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            _setns(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=target, name=f"netns:{name or fd}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def socket_in_netns(netns: str | None, family: int, type_: int, proto: int = 0) -> socket.socket:
    return run_in_netns(netns, lambda: socket.socket(family, type_, proto))


def create_netns(name: str) -> None:
    """Create a named namespace (``/run/netns/NAME``) with its loopback up (labs and tests)."""
    from netd.dataplane.netlink import Netlink

    pr_netns.create(name)
    with Netlink(name) as nl:
        nl.set_up("lo")


def remove_netns(name: str) -> bool:
    """Remove a named namespace; False when it was already gone."""
    if name not in pr_netns.listnetns():
        return False
    try:
        pr_netns.remove(name)
    except FileNotFoundError:
        return False
    return True


def list_netns(prefix: str = "") -> list[str]:
    """Named namespaces (``/run/netns``) starting with ``prefix``, sorted."""
    return sorted(n for n in pr_netns.listnetns() if n.startswith(prefix))


def _ids(names: Iterable[str]) -> set[tuple[int, int]]:
    ids = set()
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(netns_path(name))
            ids.add((st.st_dev, st.st_ino))
    return ids


def pids_in_netns(names: Iterable[str], alive: Callable[[int], bool] = lambda _: True
                  ) -> list[int]:
    """Every process (but this one) whose network namespace is one of ``names``."""
    ids = _ids(names)
    if not ids:
        return []
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        with contextlib.suppress(OSError):
            st = os.stat(entry / "ns" / "net")
            if (st.st_dev, st.st_ino) in ids and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


__all__ = [
    "NETNS_RUN_DIR",
    "check_container_netns",
    "create_netns",
    "list_netns",
    "netns_exists",
    "netns_path",
    "open_netns",
    "pids_in_netns",
    "remove_netns",
    "run_in_netns",
    "run_in_netns_fd",
    "same_netns",
    "socket_in_netns",
]
