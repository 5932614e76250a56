"""Port guards: a container sends only from the MAC and addresses the IPAM gave it.

Every frame a container sends through its host end is checked before the bridge
forwards it or learns its source: the source MAC must be the container's;
IPv4 only from its addresses; ARP only with its MAC and one of its addresses
(or 0.0.0.0: an RFC 5227 probe) as sender; IPv6 only from its addresses and
its link-local one (or ``::`` for duplicate address detection), neighbour
advertisements only for those, router advertisements and redirects never;
every other frame (other ethertypes, VLAN tags) is dropped. Addresses allowed
for a container besides its own (a VRRP address, Neutron's
allowed-address-pairs) count as its own.

Why nftables' bridge family, not tc on each host end: one table per agent
(``bridge netd_<scope>``), one base chain at bridge prerouting (before the
bridge learns a source MAC or forwards the frame), and a verdict map from the
ingress port to that port's own chain. A frame costs one hash lookup and a
handful of rules of its own port's chain, whatever the number of ports (a tc
filter list would be as cheap per port, but is per device, has no way to
match a neighbour advertisement's target, and changes filter by filter); a
port's chain and its map entry are added, replaced or removed in one atomic
transaction (libnftables, ~1 ms in process, :mod:`netd.dataplane.nft`); and
``nft list table bridge netd_br0`` shows an operator every guard with the
owner in its comment. The guard of a port can exist before the port does
(it matches the port's name); the L2 driver keeps the port down until its
guard is in place.

:func:`render` is pure (unit-tested); :class:`GuardTable` applies, checks,
lists and sweeps.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from netd.dataplane.errors import DataplaneError
from netd.dataplane.model import eui64_link_local, normalize_mac
from netd.dataplane.nft import Nft

log = logging.getLogger(__name__)

CHAIN_PREFIX = "port_"
MAP = "ports"
BASE_CHAIN = "prerouting"
PRIORITY = -300  # bridge "dstnat": before everything else at prerouting
_IDENT = re.compile(r"[^A-Za-z0-9_]")


@dataclass(frozen=True)
class PortGuard:
    """What one port may send: its MAC, its addresses (allowed extra ones included)."""

    port: str  # the host end, e.g. ndv0123456789ab
    mac: str
    addresses: tuple[str, ...]  # IPv4 and IPv6, without prefix
    owner: str = ""  # "container id/ifname", for the comment

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,15}", self.port):
            raise ValueError(f"bad port name {self.port!r}")

    @property
    def chain(self) -> str:
        return CHAIN_PREFIX + _IDENT.sub("_", self.port)

    def ipv4(self) -> list[str]:
        return sorted({str(ipaddress.ip_address(a)) for a in self.addresses
                       if ipaddress.ip_address(a).version == 4}, key=ipaddress.IPv4Address)

    def ipv6(self) -> list[str]:
        found = {str(ipaddress.ip_address(a)) for a in self.addresses
                 if ipaddress.ip_address(a).version == 6}
        found.add(eui64_link_local(self.mac))
        return sorted(found, key=ipaddress.IPv6Address)

    def rules(self) -> list[str]:
        """The port chain's rules, in order (nft syntax; every value validated above).

        A one-value match is written as a plain comparison, not a set: each set in
        a rule is an anonymous set the kernel makes with the chain, which doubles
        what installing a guard costs (an IPv4-only container's guard has none).
        """
        mac = normalize_mac(self.mac)
        v4, v6 = self.ipv4(), self.ipv6()
        out = [f"ether saddr != {mac} drop",
               "ether type vlan drop"]
        if v4:
            out += [
                "arp htype != 1 drop",
                "arp ptype != ip drop",
                f"arp saddr ether != {mac} drop",
                "arp saddr ip 0.0.0.0 accept",  # an RFC 5227 probe
                f"arp saddr ip != {_one_of(v4)} drop",
                "ether type arp accept",
                f"ip saddr != {_one_of(v4)} drop",
                "ether type ip accept",
            ]
        targets = _one_of(["0x" + ipaddress.IPv6Address(a).packed.hex() for a in v6])
        out += [
            "icmpv6 type nd-router-advert drop",
            "icmpv6 type nd-redirect drop",
            "ip6 saddr :: icmpv6 type nd-neighbor-solicit accept",  # duplicate address detection
            "ip6 saddr :: icmpv6 type mld2-listener-report accept",
            f"ip6 saddr != {_one_of(v6)} drop",
            f"icmpv6 type nd-neighbor-advert @th,64,128 != {targets} drop",
            "ether type ip6 accept",
            "drop",
        ]
        return out

    def digest(self) -> str:
        """Stands for the rules in the chain's comment; CHECK compares it."""
        return hashlib.sha256("\n".join(self.rules()).encode()).hexdigest()[:16]

    def comment(self) -> str:
        owner = re.sub(r"[^\x21-\x7e]|\"", "", self.owner)[:100]  # nft keeps 128 bytes
        return f"netd {self.digest()} {owner}".strip()


def _one_of(values: Sequence[str]) -> str:
    """``x`` for one value, ``{ x, y }`` for more (an anonymous set)."""
    return values[0] if len(values) == 1 else "{ " + ", ".join(values) + " }"


def table_name(scope: str) -> str:
    """``netd_<scope>``: one table per agent (the L2 driver's scope is its bridge)."""
    return "netd_" + _IDENT.sub("_", scope)


def render_table(scope: str) -> str:
    """The table, its map and its base chain (idempotent: ``add`` keeps what exists)."""
    t = table_name(scope)
    return "\n".join([
        f"add table bridge {t} {{ comment \"netd: port guards of the agent on {scope}\"; }}",
        f"add map bridge {t} {MAP} {{ type ifname : verdict; }}",
        f"add chain bridge {t} {BASE_CHAIN} {{ type filter hook prerouting priority "
        f"{PRIORITY}; policy accept; }}",
    ]) + "\n"


def render_install(scope: str, guard: PortGuard) -> str:
    """One transaction: the port's chain (made or emptied), its rules, its map entry.

    The last rule carries the comment (owner, digest of the rules) that CHECK
    reads back; the chain has none: "add chain" does not change an existing
    chain's comment, so one would keep the first guard's digest.
    """
    t = table_name(scope)
    rules = guard.rules()
    rules[-1] += f" comment \"{guard.comment()}\""
    lines = [
        # no chain comment: "add chain" keeps an existing chain's, which would go stale
        f"add chain bridge {t} {guard.chain}",
        f"flush chain bridge {t} {guard.chain}",
        *(f"add rule bridge {t} {guard.chain} {rule}" for rule in rules),
        f"add element bridge {t} {MAP} {{ \"{guard.port}\" : jump {guard.chain} }}",
    ]
    return "\n".join(lines) + "\n"


def render_remove(scope: str, port: str, chain: str | None = None) -> str:
    t = table_name(scope)
    chain = chain or CHAIN_PREFIX + _IDENT.sub("_", port)
    return (f"delete element bridge {t} {MAP} {{ \"{port}\" }}\n"
            f"delete chain bridge {t} {chain}\n")


@dataclass(frozen=True)
class Installed:
    """A port guard as nftables has it."""

    port: str | None  # the map entry pointing at the chain, if any
    chain: str
    comment: str
    rules: int

    def owner(self) -> tuple[str, str] | None:
        """(container id, ifname) from the comment ``netd <digest> <id>/<ifname>``."""
        parts = self.comment.split(" ", 2)
        if len(parts) < 3 or "/" not in parts[2]:
            return None
        cid, _, ifname = parts[2].rpartition("/")
        return (cid, ifname) if cid and ifname else None


class _Change:
    """One change waiting for its transaction (see :meth:`GuardTable._apply`)."""

    __slots__ = ("done", "error", "script")

    def __init__(self, script: str) -> None:
        self.script = script
        self.done = False
        self.error: DataplaneError | None = None


class GuardTable:
    """The port guards of one agent (its scope) in one namespace.

    Changes asked for at the same time (32 ADDs at once) are committed together,
    in one transaction (a group commit): each transaction costs a cache fetch
    and a commit of its own, and they would otherwise queue one after another.
    """

    def __init__(self, scope: str, netns: str | None = None, nft: Nft | None = None) -> None:
        self.scope = scope
        self.table = table_name(scope)
        self.nft = nft or Nft(netns)
        self._ready = False
        self._snapshot: tuple[float, dict[str, Installed]] | None = None
        self._pending: list[_Change] = []
        self._pending_lock = threading.Lock()
        self._commit = threading.Lock()

    def _apply(self, script: str) -> None:
        """Run ``script`` atomically, with whatever other changes wait at the same time.

        The first waiter commits everything queued in one transaction; if that
        fails, each change is run alone, so one bad change fails only its caller.
        """
        change = _Change(script)
        with self._pending_lock:
            self._pending.append(change)
        with self._commit:
            if not change.done:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                try:
                    self.nft.run("".join(c.script for c in batch))
                except DataplaneError:
                    for c in batch:
                        try:
                            self.nft.run(c.script)
                        except DataplaneError as exc:
                            c.error = exc
                for c in batch:
                    c.done = True
        if change.error is not None:
            raise change.error

    def close(self) -> None:
        self.nft.close()

    def ensure(self) -> None:
        """Make the table, its map and base chain (once per agent; idempotent)."""
        if not self._ready:
            base = self.nft.json(f"list chain bridge {self.table} {BASE_CHAIN}") \
                if self._exists() else []
            script = render_table(self.scope)
            if not any("rule" in o for o in base):
                script += f"add rule bridge {self.table} {BASE_CHAIN} iifname vmap @{MAP}\n"
            self.nft.run(script)
            self._ready = True

    def _exists(self) -> bool:
        tables = self.nft.json("list tables bridge")
        return any(o.get("table", {}).get("name") == self.table for o in tables)

    def exists(self) -> bool:
        return self._exists()

    def delete(self) -> None:
        """Remove the whole table (every guard of this agent)."""
        self._snapshot = None
        self._ready = False
        self.nft.run(f"delete table bridge {self.table}")

    def install(self, guard: PortGuard) -> None:
        """Add or replace a port's guard, atomically."""
        self.ensure()
        self._snapshot = None
        self._apply(render_install(self.scope, guard))

    def remove(self, port: str) -> bool:
        """Remove a port's guard; False when there was none (one transaction, ~1 ms)."""
        chain = CHAIN_PREFIX + _IDENT.sub("_", port)
        t = self.table
        self._snapshot = None
        try:
            self._apply(f"delete element bridge {t} {MAP} {{ \"{port}\" }}\n"
                        f"delete chain bridge {t} {chain}\n")
            return True
        except DataplaneError:
            pass  # one of the two is gone already: remove the other alone
        removed = False
        for command in (f"delete element bridge {t} {MAP} {{ \"{port}\" }}",
                        f"delete chain bridge {t} {chain}"):
            try:
                self.nft.run(command)
                removed = True
            except DataplaneError:
                continue
        return removed

    def drop(self, found: Installed) -> None:
        """Remove a guard as :meth:`installed` listed it."""
        self._drop(found)

    def _drop(self, found: Installed) -> None:
        t = self.table
        script = ""
        if found.port is not None:
            script += f"delete element bridge {t} {MAP} {{ \"{found.port}\" }}\n"
        script += f"delete chain bridge {t} {found.chain}\n"
        self.nft.run(script)
        self._snapshot = None

    def installed(self, max_age: float = 0.0) -> dict[str, Installed]:
        """Every port guard of this table, by port (a chain no map entry names: by chain).

        One listing of the table (~50 ms for 200 ports), parsed from nftables'
        text output (its JSON output is twice as slow). ``max_age``: a listing
        at most that many seconds old is reused (a reconcile pass checks every
        port against one listing; local changes drop it).
        """
        now = time.monotonic()
        if max_age and self._snapshot is not None and now - self._snapshot[0] <= max_age:
            return self._snapshot[1]
        if not self._exists():
            return {}
        table = self.nft.run(f"list table bridge {self.table}")
        ports = {chain: port for port, chain in _ELEMENT.findall(table)}
        out = {}
        for chain, body in _CHAIN.findall(table):
            lines = [line.strip() for line in body.splitlines() if line.strip()]
            comment, rules = _rule_comment(lines)
            port = ports.get(chain)
            out[port or chain] = Installed(port, chain, comment, len(rules))
        self._snapshot = (now, out)
        return out

    def one(self, port: str, chain: str) -> Installed | None:
        """One port's guard, read alone."""
        try:
            text = self.nft.run(f"list chain bridge {self.table} {chain}")
        except DataplaneError:
            return None  # no such chain (or table)
        body = _CHAIN.search(text)
        lines = [line.strip() for line in (body.group(2) if body else "").splitlines()
                 if line.strip()]
        comment, rules = _rule_comment(lines)
        try:  # nftables 1.0 answers "get element" in text only, even when asked for JSON
            found = self.nft.run(f"get element bridge {self.table} {MAP} {{ \"{port}\" }}")
        except DataplaneError:
            found = ""
        mapped = port if (port, chain) in _ELEMENT.findall(found) else None
        return Installed(mapped, chain, comment, len(rules))

    def check(self, guard: PortGuard, *, max_age: float | None = None) -> list[str]:
        """What is missing or different from ``guard`` (empty when it is in place).

        ``max_age``: judge from a table listing at most that old (see
        :meth:`installed`) instead of reading the port's chain alone.
        """
        if max_age is None:
            found = self.one(guard.port, guard.chain)
        else:
            found = self.installed(max_age).get(guard.port)
        if found is None or found.port is None:
            return [f"the port guard of {guard.port} is missing (nft table bridge "
                    f"{self.table})"]
        if found.chain != guard.chain or not found.comment.startswith(
                f"netd {guard.digest()}") or found.rules != len(guard.rules()):
            return [f"the port guard of {guard.port} is not what netd installed for "
                    f"{guard.mac} {' '.join(guard.addresses)}"]
        return []

    def sweep(self, keep: Iterable[str]) -> list[str]:
        """Remove the guards of ports not in ``keep``; what was removed."""
        wanted = set(keep)
        removed = []
        for name, found in self.installed().items():
            if found.port is None or found.port not in wanted:
                self._drop(found)
                removed.append(f"removed the port guard of {name}")
        return removed


_ELEMENT = re.compile(r'"([A-Za-z0-9_.\-]+)"\s*:\s*(?:jump|goto)\s+([A-Za-z0-9_]+)')
_CHAIN = re.compile(rf"chain ({CHAIN_PREFIX}[A-Za-z0-9_]+) \{{\n(.*?)\n\t\}}", re.S)
_RULE_COMMENT = re.compile(r'comment "(netd [^"]*)"')


def _rule_comment(lines: list[str]) -> tuple[str, list[str]]:
    """A listed chain's rules and the netd comment of its rules (a chain's own comment,
    listed as a line ``comment "..."``, is not a rule and says nothing about them)."""
    rules = [line for line in lines if not line.startswith("comment ")]
    comment = next((m.group(1) for line in rules
                    if (m := _RULE_COMMENT.search(line)) is not None), "")
    return comment, rules


def guard_for(port: str, mac: str, addresses: Sequence[str], owner: str = "") -> PortGuard:
    """A :class:`PortGuard` from an address list that may carry prefix lengths."""
    plain = tuple(str(ipaddress.ip_interface(a).ip) if "/" in a else str(ipaddress.ip_address(a))
                  for a in addresses)
    if not plain:
        raise DataplaneError(f"a port guard for {port} needs at least one address")
    return PortGuard(port, normalize_mac(mac), plain, owner)


__all__ = ["GuardTable", "Installed", "PortGuard", "eui64_link_local", "guard_for",
           "render_install", "render_remove", "render_table", "table_name"]
