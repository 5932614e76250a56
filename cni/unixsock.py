"""Root-only unix sockets: how every socket the agent serves is made and who may use it.

The agent's CNI socket and the Docker plugin socket both plumb containers as
root, so both are created 0600 (no chmod race: the umask makes them so) and
both check the connecting process's credentials (``SO_PEERCRED``): only root,
or the agent's own user, is served. Both serve a bounded number of connections
at once (:class:`BoundedThreads`), each with a read timeout, so silent or slow
clients cannot pin the agent's threads.
"""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import struct
import threading
from collections.abc import Iterator
from typing import Any

_CREDS = struct.Struct("3i")


@contextlib.contextmanager
def root_only_socket(path: str) -> Iterator[None]:
    """Bind a unix socket at ``path`` inside this block; it ends up mode 0600.

    A stale socket of a dead process is removed; a live one is an error.
    """
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise RuntimeError(f"something already serves {path}")
        finally:
            probe.close()
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)
    os.chmod(path, 0o600)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
    pid, uid, gid = _CREDS.unpack(raw)
    return pid, uid, gid


def peer_allowed(sock: socket.socket) -> bool:
    """Root, or the user this process runs as."""
    return peer_credentials(sock)[1] in (0, os.getuid())


class BoundedThreads(socketserver.ThreadingMixIn):
    """One thread per connection, at most ``max_connections`` at once.

    A connection beyond the bound is given :meth:`busy` (a "try again later" in
    the socket's protocol) and closed at once, never queued behind the others.
    """

    daemon_threads = True
    max_connections = 128
    _slots: threading.BoundedSemaphore | None = None

    def busy(self, request: socket.socket) -> bytes:
        """What a connection over the bound is told before it is closed."""
        raise NotImplementedError

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._slots is None:
            self._slots = threading.BoundedSemaphore(self.max_connections)
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(self.busy(request))
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            assert self._slots is not None
            self._slots.release()


__all__ = ["BoundedThreads", "peer_allowed", "peer_credentials", "root_only_socket"]
