"""Which driver serves which ``mode``: the one table the agent looks a mode up in.

Drivers are named by module and class and imported only when their mode is
used, so that a host in L2 mode needs nothing of OVS or BGP installed.
"""

from __future__ import annotations

import importlib

from netd.dataplane.driver import Driver
from netd.errors import InvalidInput

#: mode -> (module, class)
DRIVERS: dict[str, tuple[str, str]] = {
    "l2": ("netd.dataplane.l2driver", "L2Driver"),
    "vlan": ("netd.ovs.driver", "VlanDriver"),
    "bgp": ("netd.bgp.driver", "BgpDriver"),
}


def modes() -> tuple[str, ...]:
    """The modes an agent can run, in the order the documentation lists them."""
    return tuple(DRIVERS)


def driver_class(mode: str) -> type[Driver]:
    """The driver of ``mode``; :class:`InvalidInput` naming the known modes otherwise."""
    if mode not in DRIVERS:
        raise InvalidInput(f"unknown mode {mode!r}: this agent knows "
                           f"{', '.join(repr(m) for m in modes())}")
    module, name = DRIVERS[mode]
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Driver)) or cls.mode != mode:
        raise TypeError(f"{module}.{name} is not the driver of mode {mode!r}")
    return cls


__all__ = ["DRIVERS", "driver_class", "modes"]
