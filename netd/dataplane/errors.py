"""Errors the dataplane raises; all are :class:`netd.errors.NetdError`."""

from __future__ import annotations

from netd.errors import NetdError


class DataplaneError(NetdError):
    """A kernel operation failed (netlink, packet socket, iptables)."""

    code = "dataplane_error"
    status = 500


class NetnsNotFound(DataplaneError):
    """The network namespace (name or path) does not exist (any more)."""

    code = "netns_not_found"
    status = 404


class NotAContainerNetns(DataplaneError):
    """What was given as a container's namespace is not one: a file, a directory, another
    kind of namespace, a relative path, or the host's own network namespace."""

    code = "invalid_netns"
    status = 422


class PoolNotUsable(DataplaneError):
    """The pool cannot serve this mode (the vlan mode: no VLAN, a VLAN the trunk does not
    carry); refused before anything is allocated or made."""

    code = "pool_not_usable"
    status = 422


class LinkNotFound(DataplaneError):
    code = "link_not_found"
    status = 404


class LinkExists(DataplaneError):
    code = "link_exists"
    status = 409


class AddressConflict(DataplaneError):
    """Another machine on the wire answered for the address (ARP duplicate detection)."""

    code = "address_conflict"
    status = 409

    def __init__(self, ip: str, mac: str) -> None:
        super().__init__(f"address {ip} is already used on the wire by {mac}")
        self.ip = ip
        self.mac = mac


class PlanError(DataplaneError):
    """The host's configuration cannot be taken over safely as it is."""

    code = "plan_error"
    status = 422


class TakeoverFailed(DataplaneError):
    """The takeover was made, failed its check and was rolled back."""

    code = "takeover_failed"
    status = 500
