"""Root-only unix sockets: how every socket the agent serves is made and who may use it.

The agent's CNI socket and the Docker plugin socket both plumb containers as
root, so both are created 0600 (no chmod race: the umask makes them so) and
both check the connecting process's credentials (``SO_PEERCRED``): only root,
or the agent's own user, is served.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator

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


__all__ = ["peer_allowed", "peer_credentials", "root_only_socket"]
