"""OVSDB through ovsdbapp (the library Neutron's OVS agent uses), over the db socket.

One :class:`Ovsdb` per agent: ovsdbapp keeps a replica of the database in
memory (an IDL with its own thread), so reads cost nothing and each change is
one transaction that returns when ovs-vswitchd has applied it (``cur_cfg``
caught up) and the interfaces it added have an ofport: a port is really on the
bridge when :meth:`add_port` returns. No ``ovs-vsctl`` process per ADD.

Every port netd makes carries ``external_ids`` on its Interface: ``netd`` (the
agent's scope: its bridge), ``netd-owner`` (``<container id>/<ifname>``),
``iface-id`` (the same, as Neutron names it), ``attached-mac``, ``ip`` and
``netd-allowed`` (extra addresses): the flows of a port can be rebuilt from
the database alone, and reconcile and the sweep find netd's ports by them.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from netd.dataplane.errors import DataplaneError

log = logging.getLogger(__name__)

MARK = "netd"
OWNER = "netd-owner"
ROLE = "netd-role"  # "uplink" on the trunk port netd added
ALLOWED = "netd-allowed"


class OvsdbError(DataplaneError):
    code = "ovsdb_error"


def _api() -> Any:
    # ovs.poller looks for eventlet (os-ken brings it) and warns that it is deprecated;
    # netd uses neither eventlet nor its hub
    warnings.filterwarnings("ignore", message=r"(?s).*Eventlet is deprecated")
    from ovsdbapp.backend.ovs_idl import connection
    from ovsdbapp.schema.open_vswitch import impl_idl

    return connection, impl_idl


#: what the replica holds: the tables and columns netd reads or writes. Not every
#: table: ovs-vswitchd rewrites each Interface's statistics and status every few seconds,
#: and the IDL decodes every update in Python (with 60 ports that slowed each of
#: netd's transactions to 15-20 ms, against 2-3 ms with these columns)
MONITORED: dict[str, tuple[str, ...] | None] = {
    "Open_vSwitch": ("bridges", "cur_cfg", "next_cfg"),
    "Bridge": None,  # every column: few rows, rarely changed
    "Port": ("name", "interfaces", "tag", "trunks", "external_ids", "other_config"),
    "Interface": ("name", "type", "ofport", "ofport_request", "external_ids", "mtu_request",
                  "options", "error"),
}


def _schema_helper(url: str) -> Any:
    from ovsdbapp.backend.ovs_idl import idlutils

    helper = idlutils.get_schema_helper(url, "Open_vSwitch")
    for table, columns in MONITORED.items():
        if columns is None:
            helper.register_table(table)
        else:
            helper.register_columns(table, list(columns))
    return helper


_NO_WAIT: Any = None


def _no_wait_transaction() -> Any:
    """ovsdbapp's ovs-vsctl-like transaction without its wait for ovs-vswitchd (what
    ``ovs-vsctl --no-wait`` does); it still asks ovs-vswitchd to reconfigure."""
    global _NO_WAIT
    if _NO_WAIT is None:
        _, impl_idl = _api()

        class NoWait(impl_idl.OvsVsctlTransaction):  # type: ignore[misc, name-defined]
            def do_post_commit(self, txn: Any) -> None:
                return None

        _NO_WAIT = NoWait
    return _NO_WAIT


@dataclass(frozen=True)
class OvsPort:
    """A port of a bridge with its (first) interface."""

    name: str
    bridge: str
    ofport: int | None
    tag: int | None
    trunks: tuple[int, ...]
    type: str
    external_ids: Mapping[str, str] = field(default_factory=dict)
    ofport_request: int | None = None

    @property
    def scope(self) -> str | None:
        return self.external_ids.get(MARK)

    @property
    def owner(self) -> tuple[str, str] | None:
        text = self.external_ids.get(OWNER, "")
        cid, _, ifname = text.rpartition("/")
        return (cid, ifname) if cid and ifname else None


@dataclass(frozen=True)
class OvsBridge:
    name: str
    datapath_type: str
    fail_mode: str | None
    protocols: tuple[str, ...]
    other_config: Mapping[str, str]
    ports: tuple[str, ...]


def _one(value: Any) -> Any:
    """An optional OVSDB column (a list of zero or one) as a value or None."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


class Ovsdb:
    """The Open_vSwitch database of one ovs-vswitchd (``unix:PATH`` of its db socket)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url
        self.timeout = timeout
        self._api: Any = None
        self._lock = threading.Lock()

    @property
    def api(self) -> Any:
        with self._lock:
            if self._api is None:
                connection, impl_idl = _api()
                try:
                    idl = connection.OvsdbIdl(self.url, _schema_helper(self.url))
                    conn = connection.Connection(idl=idl, timeout=self.timeout)
                    # ovsdbapp keeps the connection in a class attribute: one class per
                    # database, or a second Ovsdb (a test, a lab) would talk to the first's
                    cls = type(f"OvsdbIdl_{id(self):x}", (impl_idl.OvsdbIdl,), {})
                    self._api = cls(conn)
                except Exception as exc:
                    raise OvsdbError(f"cannot reach OVSDB at {self.url}: {exc}") from None
            return self._api

    def close(self) -> None:
        with self._lock:
            api, self._api = self._api, None
        if api is not None:
            try:
                api.ovsdb_connection.stop()
            except Exception:
                log.debug("ovsdb: stopping the connection failed", exc_info=True)

    def _txn(self, commands: Iterable[Any], *, wait: bool = True) -> None:
        """One transaction; with ``wait``, returns when ovs-vswitchd has applied it
        (what ``ovs-vsctl`` does; ``--no-wait`` otherwise)."""
        api = self.api
        try:
            if wait:
                with api.transaction(check_error=True) as txn:
                    for c in commands:
                        txn.add(c)
            else:
                txn = _no_wait_transaction()(api, api.ovsdb_connection, check_error=True)
                for c in commands:
                    txn.add(c)
                txn.commit()
        except Exception as exc:
            raise OvsdbError(f"OVSDB transaction failed: {exc}") from None

    # --- reads (from the in-memory replica) ---------------------------------------------

    def _rows(self, table: str) -> list[Any]:
        return list(self.api.tables[table].rows.values())

    def bridge(self, name: str) -> OvsBridge | None:
        for row in self._rows("Bridge"):
            if row.name == name:
                return OvsBridge(row.name, row.datapath_type or "system", _one(row.fail_mode),
                                 tuple(row.protocols), dict(row.other_config),
                                 tuple(p.name for p in row.ports))
        return None

    @staticmethod
    def _port_of(row: Any, bridge: str) -> OvsPort:
        iface = row.interfaces[0] if row.interfaces else None
        return OvsPort(
            name=row.name, bridge=bridge,
            ofport=_one(iface.ofport) if iface is not None else None,
            tag=_one(row.tag), trunks=tuple(row.trunks),
            type=iface.type if iface is not None else "",
            external_ids=dict(iface.external_ids) if iface is not None else {},
            ofport_request=_one(iface.ofport_request) if iface is not None else None)

    def ports(self, bridge: str | None = None) -> list[OvsPort]:
        """Ports (of ``bridge``, or of every bridge), each with its first interface."""
        return [self._port_of(port, br.name) for br in self._rows("Bridge")
                if bridge is None or br.name == bridge for port in br.ports]

    def port(self, name: str) -> OvsPort | None:
        """One port by name: the IDL's name index, not a walk over every port (each
        attribute of an IDL row is decoded when read: at 60 ports, reading them all
        was a third of an ADD)."""
        from ovsdbapp.backend.ovs_idl import idlutils

        row = idlutils.row_by_value(self.api.idl, "Port", "name", name, None)
        if row is None:
            return None
        bridge = next((br.name for br in self._rows("Bridge")
                       if any(p.uuid == row.uuid for p in br.ports)), "")
        return self._port_of(row, bridge)

    def ofports_in_use(self, bridge: str) -> set[int]:
        """The ofports taken or asked for, on any bridge (a superset is safe)."""
        used = set()
        for iface in self._rows("Interface"):
            for n in (_one(iface.ofport), _one(iface.ofport_request)):
                if isinstance(n, int) and n > 0:
                    used.add(n)
        return used

    # --- changes ------------------------------------------------------------------------

    def ensure_bridge(self, name: str, *, datapath_type: str, hwaddr: str | None,
                      mtu: int | None = None) -> list[str]:
        """The bridge, ``fail_mode=secure``, OpenFlow 1.3 (and 1.0, for ovs-ofctl),
        in-band control off, ``hwaddr``; its own port untagged only. What changed."""
        api = self.api
        have = self.bridge(name)
        cmds: list[Any] = []
        changes: list[str] = []
        if have is None:
            cmds.append(api.add_br(name, datapath_type=datapath_type))
            changes.append(f"ovs-vsctl add-br {name} -- set bridge {name} "
                           f"datapath_type={datapath_type}")
        elif have.datapath_type != datapath_type:
            raise OvsdbError(f"bridge {name} has datapath_type {have.datapath_type}, not "
                             f"{datapath_type} ([vlan] datapath_type)")
        other = dict(have.other_config if have else {})
        want_other = {**other, "disable-in-band": "true"}
        if hwaddr:
            want_other["hwaddr"] = hwaddr
        columns: dict[str, Any] = {}
        if have is None or have.fail_mode != "secure":
            columns["fail_mode"] = "secure"
            changes.append(f"ovs-vsctl set-fail-mode {name} secure")
        if have is None or set(have.protocols) != {"OpenFlow10", "OpenFlow13"}:
            columns["protocols"] = ["OpenFlow10", "OpenFlow13"]
            changes.append(f"ovs-vsctl set bridge {name} protocols=OpenFlow10,OpenFlow13")
        if want_other != other:
            columns["other_config"] = want_other
            changes.append(f"ovs-vsctl set bridge {name} other_config:hwaddr={hwaddr} "
                           "other_config:disable-in-band=true")
        if columns:
            cmds.append(api.db_set("Bridge", name, *columns.items()))
        local = next((p for p in self.ports(name) if p.name == name), None)
        if local is None or local.trunks != (0,):
            cmds.append(api.db_set("Port", name, ("trunks", [0])))
            changes.append(f"ovs-vsctl set port {name} trunks=0  # the host's own port: "
                           "untagged frames only")
        if mtu:
            cmds.append(api.db_set("Interface", name, ("mtu_request", mtu)))
        if cmds:
            self._txn(cmds)
        return changes

    def delete_bridge(self, name: str) -> None:
        self._txn([self.api.del_br(name)])

    def add_port(self, bridge: str, name: str, *, tag: int | None = None,
                 trunks: Iterable[int] | None = None, ofport: int | None = None,
                 external_ids: Mapping[str, str] | None = None,
                 mtu: int | None = None, wait: bool = True) -> OvsPort:
        """Add (or update in place) a system port; returns it with its ofport (with
        ``wait``; without, ovs-vswitchd assigns it a moment later).

        An existing port of the same name is reconfigured in the same
        transaction (a stale port of the same owner is replaced, never doubled).
        """
        api = self.api
        iface: list[tuple[str, Any]] = []
        if external_ids is not None:
            iface.append(("external_ids", dict(external_ids)))
        if ofport is not None:
            iface.append(("ofport_request", ofport))
        if mtu:
            iface.append(("mtu_request", mtu))
        port: list[tuple[str, Any]] = [("tag", tag if tag is not None else []),
                                       ("trunks", list(trunks or []))]
        existing = self.port(name)
        cmds: list[Any] = []
        if existing is not None and existing.bridge != bridge:
            cmds.append(api.del_port(name, bridge=existing.bridge))
        cmds.append(api.add_port(bridge, name, may_exist=True))
        cmds.append(api.db_set("Port", name, *port))
        if iface:
            cmds.append(api.db_set("Interface", name, *iface))
        self._txn(cmds, wait=wait)
        got = self.port(name)
        if got is None or (wait and (not got.ofport or got.ofport < 0)):
            raise OvsdbError(f"ovs-vswitchd could not add {name} to {bridge}")
        return got

    def set_port(self, name: str, *, tag: int | None = None,
                 external_ids: Mapping[str, str] | None = None, wait: bool = True) -> None:
        cmds = [self.api.db_set("Port", name, ("tag", tag if tag is not None else []))]
        if external_ids is not None:
            cmds.append(self.api.db_set("Interface", name, ("external_ids",
                                                            dict(external_ids))))
        self._txn(cmds, wait=wait)

    def del_port(self, name: str, *, wait: bool = True) -> bool:
        """Remove a port; ``wait=False`` returns once OVSDB has committed (the port is
        gone for every reader; ovs-vswitchd lets go of it a moment later)."""
        existing = self.port(name)
        if existing is None:
            return False
        self._txn([self.api.del_port(name, bridge=existing.bridge, if_exists=True)],
                  wait=wait)
        return True


__all__ = ["ALLOWED", "MARK", "OWNER", "ROLE", "OvsBridge", "OvsPort", "Ovsdb", "OvsdbError"]
