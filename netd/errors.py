"""The error hierarchy every layer raises and every edge maps.

Each error carries a stable machine ``code`` (clients and tests match on it)
and an HTTP ``status``. The API maps them to JSON in one place
(:mod:`netd.ipam.api`), the CLI to a one-line message and exit code.
"""

from __future__ import annotations


class NetdError(Exception):
    """Base class: a user-facing failure with a stable code."""

    code = "error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidInput(NetdError):
    """The request itself is wrong; retrying it unchanged will fail again."""

    code = "invalid_input"
    status = 422


class NotFound(NetdError):
    code = "not_found"
    status = 404


class PoolNotFound(NotFound):
    code = "pool_not_found"


class Conflict(NetdError):
    """The request is valid but collides with the current state."""

    code = "conflict"
    status = 409


class PoolExists(Conflict):
    code = "pool_exists"


class PoolOverlap(Conflict):
    code = "pool_overlap"


class PoolExhausted(Conflict):
    code = "pool_exhausted"


class PoolInUse(Conflict):
    code = "pool_in_use"


class AddressInUse(Conflict):
    code = "address_in_use"


class MacInUse(Conflict):
    code = "mac_in_use"


class Unauthorized(NetdError):
    code = "unauthorized"
    status = 401


class Unavailable(NetdError):
    """A collaborator (IPAM server, datastore) cannot be reached; try later."""

    code = "unavailable"
    status = 503
