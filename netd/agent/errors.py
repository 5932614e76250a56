"""What the agent itself refuses; the integrations map these to CNI codes and Docker errors."""

from __future__ import annotations

from netd.errors import Conflict, NotFound


class NotAttached(NotFound):
    """No ready attachment of that owner on that network (CNI CHECK)."""

    code = "not_attached"


class InterfaceInUse(Conflict):
    """The owner (container id, ifname) is already attached on another network."""

    code = "interface_in_use"


class DuplicateAddress(Conflict):
    """Another machine on the wire answered for the address; it was reserved in the IPAM."""

    code = "duplicate_address"


__all__ = ["DuplicateAddress", "InterfaceInUse", "NotAttached"]
