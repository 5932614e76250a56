"""One lock per owner, shared by every path that touches an endpoint (CNI, Docker, GC,
reconcile, queued releases).

An owner is what the IPAM keys an address by: (container id, interface name).
Locks are made on first use and dropped when nobody holds *or waits for*
them; a map entry removed while a thread still waited on its lock would let
the next caller take a fresh lock and run alongside that thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

Owner = tuple[str, str]  # (container id, ifname)


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0  # threads holding or waiting for ``lock``


class OwnerLocks:
    """Serialise work per owner; entries live exactly as long as someone uses them."""

    def __init__(self) -> None:
        self._entries: dict[Owner, _Entry] = {}
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, owner: Owner) -> Iterator[None]:
        with self._guard:
            entry = self._entries.get(owner)
            if entry is None:
                entry = self._entries[owner] = _Entry()
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._entries[owner]

    def __len__(self) -> int:
        """Owners with a holder or a waiter (0 when the agent is idle)."""
        with self._guard:
            return len(self._entries)


__all__ = ["Owner", "OwnerLocks"]
