"""``netctl``: the operator CLI of the central IPAM.

A thin shell over :class:`netd.ipam.client.Client`: it parses options, calls
the API and prints aligned tables (or, with ``--json``, the JSON the server
returned). Every failure is one line on stderr and a documented exit code.
"""

from __future__ import annotations

import getpass
import ipaddress
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from netd.errors import (
    Conflict,
    InvalidInput,
    NetdError,
    NotFound,
    PoolNotFound,
    Unauthorized,
    Unavailable,
)
from netd.ipam.client import DEFAULT_URL, Client
from netd.text import escape

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_INVALID = 5
EXIT_UNAUTHORIZED = 6
EXIT_UNAVAILABLE = 7

PAGE = 1000
NUMBER_RE = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")

EPILOG = """\b
Exit codes:
  0  success
  1  other error
  2  usage error (bad option or argument)
  3  not found (pool, address)
  4  conflict (exists, overlaps, in use, exhausted)
  5  invalid input (rejected by the server)
  6  unauthorized (missing or wrong token)
  7  unavailable (server unreachable or its datastore busy)

\b
Environment: NETD_SERVER (--server), NETD_TOKEN (--token).
"""


def exit_code_for(err: NetdError) -> int:
    """The documented exit code of an error class."""
    for cls, code in ((NotFound, EXIT_NOT_FOUND), (Conflict, EXIT_CONFLICT),
                      (InvalidInput, EXIT_INVALID), (Unauthorized, EXIT_UNAUTHORIZED),
                      (Unavailable, EXIT_UNAVAILABLE)):
        if isinstance(err, cls):
            return code
    return EXIT_ERROR


def default_actor() -> str:
    """``netctl:$USER`` (``netctl:root`` when the user cannot be told)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    user = "".join(c for c in user if "!" <= c <= "~") or "root"  # the API's actor charset
    return f"netctl:{user}"[:64]


# --- output ---------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Aligned columns; numbers right-aligned, empty cells shown as '-'."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    right = [any(NUMBER_RE.match(r[i]) for r in cells)
             and all(NUMBER_RE.match(r[i]) or r[i] == "-" for r in cells)
             for i in range(len(headers))]
    lines = []
    for row in [list(headers), *cells]:
        parts = [text.rjust(widths[i]) if right[i] else text.ljust(widths[i])
                 for i, text in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    # one line per row, and nothing that steers the terminal, whatever the data holds
    return escape(" ".join(str(value).split()))


def iso(ts: Any) -> str:
    """A UNIX time as ISO 8601 UTC, '-' when missing."""
    if not isinstance(ts, int | float) or isinstance(ts, bool) or ts <= 0:
        return "-"
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def kv(pairs: dict[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((pairs or {}).items()))


SHORT_ID = 12  # like docker ps: a 64-hex container id is unreadable in a table


def owner(container_id: Any, ifname: Any) -> str:
    """``container/ifname`` for tables; long hex ids shortened (--json has them whole)."""
    if container_id and len(str(container_id)) == 64 and all(
            c in "0123456789abcdef" for c in str(container_id)):
        container_id = str(container_id)[:SHORT_ID]
    if not container_id:
        return "-"
    return f"{container_id}/{ifname}" if ifname else str(container_id)


def workload(labels: dict[str, str] | None) -> str:
    """Who the address belongs to, from allocation labels: pod, container name, or k=v."""
    labels = labels or {}
    pod = labels.get("pod") or labels.get("K8S_POD_NAME") or labels.get("k8s_pod_name")
    if pod:
        ns = (labels.get("namespace") or labels.get("K8S_POD_NAMESPACE")
              or labels.get("k8s_pod_namespace"))
        return f"{ns}/{pod}" if ns else pod
    name = labels.get("container_name") or labels.get("name")
    return name if name else kv(labels)


def ip_key(text: str) -> tuple[int, int]:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return (99, 0)
    return (addr.version, int(addr))


def details(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {_cell(v)}" for k, v in pairs)


# --- context ----------------------------------------------------------------


class State:
    """Global options; the client is made on first use and closed at exit."""

    def __init__(self, server: str, token: str | None, as_json: bool) -> None:
        self.server = server
        self.token = token
        self.as_json = as_json
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.server, token=self.token, actor=default_actor())
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def emit(self, data: Any, human: Callable[[], str]) -> None:
        """Print ``data`` as JSON with --json, else the human rendering."""
        if self.as_json:
            click.echo(json.dumps(data, indent=2))
        else:
            text = human()
            if text:  # cells are escaped already; this catches text built around them
                click.echo("\n".join(escape(line) for line in text.split("\n")))


pass_state = click.make_pass_decorator(State)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    state = ctx.find_object(State)
    if value and state is not None:
        state.as_json = True


json_option = click.option("--json", is_flag=True, expose_value=False, callback=_set_json,
                           help="Print machine-readable JSON (same as netctl --json).")


def _read_token_file(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}",
                                 param_hint="'--token-file'") from None
    if not token:
        raise click.BadParameter(f"{path} is empty", param_hint="'--token-file'")
    return token


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--server", envvar="NETD_SERVER", default=DEFAULT_URL, show_default=True,
              metavar="URL", help="IPAM server URL [env NETD_SERVER].")
@click.option("--token", envvar="NETD_TOKEN", metavar="T",
              help="API token (the server's, or its read-only one for reads) "
                   "[env NETD_TOKEN].")
@click.option("--token-file", metavar="F", help="Read the API token from file F.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.version_option(package_name="netd", prog_name="netctl")
@click.pass_context
def cli(ctx: click.Context, server: str, token: str | None, token_file: str | None,
        as_json: bool) -> None:
    """Operate the netd central IPAM: pools, addresses, hosts."""
    if token_file is not None:
        if token is not None and ctx.get_parameter_source("token") is (
                click.core.ParameterSource.COMMANDLINE):
            raise click.UsageError("give --token or --token-file, not both")
        token = _read_token_file(token_file)
    state = State(server, token or None, as_json)
    ctx.obj = state
    ctx.call_on_close(state.close)


# --- pools ------------------------------------------------------------------


@cli.group()
def pool() -> None:
    """Address pools: create, list, show, delete."""


def _labels(values: Sequence[str], param: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=param)
        if k in out:
            raise click.BadParameter(f"label {k!r} given twice", param_hint=param)
        out[k] = v
    return out


def _route(text: str) -> dict[str, str]:
    dst, *opts = (p.strip() for p in text.split(","))
    if not dst:
        raise click.BadParameter(f"{text!r}: a route is DST[,via=GW]", param_hint="'--route'")
    route = {"dst": dst}
    for opt in opts:
        k, sep, v = opt.partition("=")
        if k not in ("via", "gw") or not sep or not v or "gw" in route:
            raise click.BadParameter(f"{text!r}: a route is DST[,via=GW]",
                                     param_hint="'--route'")
        route["gw"] = v
    return route


def _vlan_id(text: str, param: str) -> int:
    try:
        vlan = int(text)
    except ValueError:
        vlan = 0
    if not 1 <= vlan <= 4094:
        raise click.BadParameter(f"{text!r} is not a VLAN id 1-4094"
                                 + (" or 'auto'" if param == "'--vlan'" else ""),
                                 param_hint=param)
    return vlan


def _vlan(text: str | None) -> int | str | None:
    if text is None or text == "auto":
        return text
    return _vlan_id(text, "'--vlan'")


def _vlan_range(text: str | None) -> list[int] | None:
    if text is None:
        return None
    lo, sep, hi = text.partition("-")
    if not sep:
        raise click.BadParameter(f"{text!r} is not LO-HI (e.g. 100-199)",
                                 param_hint="'--vlan-range'")
    return [_vlan_id(lo, "'--vlan-range'"), _vlan_id(hi, "'--vlan-range'")]


def _pool_line(p: dict[str, Any]) -> str:
    vlan = f" vlan {p['vlan']}" if p.get("vlan") else ""
    return f"pool {p.get('name')}: {p.get('cidr')} gateway {p.get('gateway')}{vlan} " \
           f"mode {p.get('mode')}"


def _util(p: dict[str, Any]) -> str:
    u = p.get("utilisation")
    return f"{float(u) * 100:.1f}" if isinstance(u, int | float) else "-"


@pool.command("create")
@click.argument("name")
@click.option("--cidr", metavar="CIDR", help="The pool's subnet.")
@click.option("--from", "supernet", metavar="SUPERNET",
              help="Generate the lowest free subnet inside SUPERNET (with --prefix-len).")
@click.option("--prefix-len", type=int, metavar="N", help="Prefix length of a generated subnet.")
@click.option("--gateway", metavar="IP", help="Gateway (default: first usable address).")
@click.option("--vlan", metavar="N|auto", help="VLAN id, or 'auto' for the lowest free one.")
@click.option("--vlan-range", metavar="LO-HI", help="Range 'auto' picks from.")
@click.option("--mode", type=click.Choice(["l2", "vlan", "bgp"]), default="l2",
              show_default=True, help="Dataplane mode of the pool.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label (repeatable).")
@click.option("--reserve", "reserved", multiple=True, metavar="RANGE",
              help="Reserve IP, A-B or CIDR at creation (repeatable).")
@click.option("--route", "routes", multiple=True, metavar="DST[,via=GW]",
              help="Route handed to containers (repeatable).")
@click.option("--dns-server", "nameservers", multiple=True, metavar="IP",
              help="DNS nameserver (repeatable).")
@click.option("--dns-search", "search", multiple=True, metavar="DOMAIN",
              help="DNS search domain (repeatable).")
@click.option("--dns-domain", metavar="DOMAIN", help="DNS domain.")
@click.option("--block-prefix", type=int, metavar="N", help="Per-host block size (bgp pools).")
@json_option
@pass_state
def pool_create(state: State, name: str, cidr: str | None, supernet: str | None,
                prefix_len: int | None, gateway: str | None, vlan: str | None,
                vlan_range: str | None, mode: str, labels: tuple[str, ...],
                reserved: tuple[str, ...], routes: tuple[str, ...],
                nameservers: tuple[str, ...], search: tuple[str, ...],
                dns_domain: str | None, block_prefix: int | None) -> None:
    """Create pool NAME from --cidr, or generated with --from and --prefix-len."""
    if cidr and supernet:
        raise click.UsageError("give --cidr or --from, not both")
    if not cidr and not supernet:
        raise click.UsageError("a pool needs --cidr, or --from SUPERNET --prefix-len N")
    if supernet and prefix_len is None:
        raise click.UsageError("--from needs --prefix-len")
    if cidr and prefix_len is not None:
        raise click.UsageError("--prefix-len goes with --from, not --cidr")
    fields: dict[str, Any] = {"name": name, "mode": mode,
                              "labels": _labels(labels, "'--label'"),
                              "reserved": list(reserved),
                              "routes": [_route(r) for r in routes]}
    dns: dict[str, Any] = {}
    if nameservers:
        dns["nameservers"] = list(nameservers)
    if search:
        dns["search"] = list(search)
    if dns_domain:
        dns["domain"] = dns_domain
    if dns:
        fields["dns"] = dns
    optional = {"cidr": cidr, "supernet": supernet, "prefix_len": prefix_len,
                "gateway": gateway, "vlan": _vlan(vlan), "vlan_range": _vlan_range(vlan_range),
                "block_prefix": block_prefix}
    fields.update({k: v for k, v in optional.items() if v is not None})
    created = state.client.create_pool(**fields)
    state.emit(created, lambda: "created " + _pool_line(created))


@pool.command("list")
@json_option
@pass_state
def pool_list(state: State) -> None:
    """List pools with their usage."""
    data = state.client.list_pools()
    state.emit(data, lambda: table(
        ["NAME", "CIDR", "GATEWAY", "VLAN", "MODE", "FREE", "RESERVED", "ALLOCATED", "UTIL(%)",
         "LABELS"],
        ([p.get("name"), p.get("cidr"), p.get("gateway"), p.get("vlan"), p.get("mode"),
          p.get("free"), p.get("reserved"), p.get("allocated"), _util(p), kv(p.get("labels"))]
         for p in data.get("pools", []))))


def _reservation_rows(reserved: list[dict[str, Any]]) -> list[list[Any]]:
    return [[r.get("range"), r.get("count"), r.get("handle"), r.get("note"),
             iso(r.get("created"))] for r in reserved]


@pool.command("show")
@click.argument("name")
@json_option
@pass_state
def pool_show(state: State, name: str) -> None:
    """Show a pool: settings, usage, reserved ranges and (bgp) host blocks.

    With --json: {"pool": Pool, "reserved": [Reservation], "blocks": [Block]}.
    """
    p = state.client.get_pool(name)
    reserved = state.client.pool_addresses(name, state="reserved").get("reserved", [])
    blocks = state.client.blocks(pool=name).get("blocks", []) if p.get("mode") == "bgp" else []

    def human() -> str:
        dns = p.get("dns") or {}
        dns_text = "; ".join(f"{k} {' '.join(v) if isinstance(v, list) else v}"
                             for k, v in dns.items() if v)
        routes = ", ".join(r["dst"] + (f" via {r['gw']}" if r.get("gw") else "")
                           for r in p.get("routes") or [])
        out = details([
            ("name", p.get("name")), ("cidr", p.get("cidr")), ("gateway", p.get("gateway")),
            ("mode", p.get("mode")), ("vlan", p.get("vlan")), ("labels", kv(p.get("labels"))),
            ("routes", routes), ("dns", dns_text), ("block prefix", p.get("block_prefix")),
            ("created", iso(p.get("created"))), ("size", p.get("size")), ("free", p.get("free")),
            ("reserved", p.get("reserved")), ("allocated", p.get("allocated")),
            ("utilisation", _util(p) + "%"),
        ])
        out += "\n\nReserved:\n" + table(["RANGE", "COUNT", "HANDLE", "NOTE", "CREATED"],
                                         _reservation_rows(reserved))
        if p.get("mode") == "bgp":
            out += "\n\nBlocks:\n" + table(["CIDR", "HOST"],
                                           ([b.get("cidr"), b.get("host")] for b in blocks))
        return out

    state.emit({"pool": p, "reserved": reserved, "blocks": blocks}, human)


@pool.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete even with allocated addresses (drops them).")
@json_option
@pass_state
def pool_delete(state: State, name: str, force: bool) -> None:
    """Delete a pool; refused while it has allocations unless --force."""
    data = state.client.delete_pool(name, force=force)
    dropped = data.get("dropped_allocations") or 0
    state.emit(data, lambda: f"deleted pool {data.get('deleted', name)}"
               + (f" ({dropped} allocation(s) dropped)" if dropped else ""))


# --- addresses ----------------------------------------------------------------


@cli.group()
def ip() -> None:
    """Addresses: list, show, reserve, unreserve, assign, release, history."""


def _pool_allocations(client: Client, name: str, host: str | None) -> list[dict[str, Any]]:
    """Every allocation of one pool, page by page."""
    out: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        page = client.addresses(pool=name, host=host, limit=PAGE, after=after).get(
            "addresses", [])
        out += page
        if len(page) < PAGE or page[-1].get("ip") in (None, after):
            return out
        after = page[-1]["ip"]


@ip.command("list")
@click.option("--pool", "pool_name", metavar="P", help="Only pool P.")
@click.option("--host", metavar="H", help="Only allocations on host H (hides reservations).")
@click.option("--state", "which", type=click.Choice(["allocated", "reserved", "all"]),
              default="all", show_default=True)
@json_option
@pass_state
def ip_list(state: State, pool_name: str | None, host: str | None, which: str) -> None:
    """List allocated and reserved addresses.

    With --json: {"allocated": [Allocation], "reserved": [Reservation]}.
    """
    client = state.client
    names = [pool_name] if pool_name else [p["name"] for p in client.list_pools()["pools"]]
    allocated: list[dict[str, Any]] = []
    reserved: list[dict[str, Any]] = []
    for name in names:
        try:
            if which in ("allocated", "all"):
                allocated += _pool_allocations(client, name, host)
            if which in ("reserved", "all") and (host is None or which == "reserved"):
                reserved += client.pool_addresses(name, state="reserved").get("reserved", [])
        except PoolNotFound:
            if pool_name:
                raise
            # deleted while we listed: nothing to show for it

    def human() -> str:
        rows: list[tuple[tuple[str, tuple[int, int]], list[Any]]] = []
        for a in allocated:
            rows.append(((a.get("pool", ""), ip_key(a.get("ip", ""))),
                         [a.get("pool"), a.get("ip"), a.get("mac"), "allocated",
                          owner(a.get("container_id"), a.get("ifname")), a.get("host"),
                          a.get("handle"), workload(a.get("labels"))]))
        for r in reserved:
            rows.append(((r.get("pool", ""), ip_key(r.get("first", ""))),
                         [r.get("pool"), r.get("range"), None, "reserved", None, None,
                          r.get("handle"), r.get("note")]))
        rows.sort(key=lambda x: x[0])
        return table(["POOL", "IP", "MAC", "STATE", "OWNER", "HOST", "HANDLE", "LABELS"],
                     (r for _, r in rows))

    state.emit({"allocated": allocated, "reserved": reserved}, human)


@ip.command("show")
@click.argument("address", metavar="IP")
@json_option
@pass_state
def ip_show(state: State, address: str) -> None:
    """Show one address: free, reserved or allocated, and by whom."""
    data = state.client.show(address)

    def human() -> str:
        pairs: list[tuple[str, Any]] = [("ip", data.get("ip")), ("pool", data.get("pool")),
                                        ("cidr", data.get("cidr")), ("state", data.get("state"))]
        for k in ("container_id", "ifname", "host", "netns", "mac", "handle"):
            if k in data:
                pairs.append((k, data[k]))
        if "labels" in data:
            pairs.append(("labels", kv(data.get("labels"))))
        if data.get("allowed"):
            pairs.append(("allowed", ", ".join(data["allowed"])))
        if "note" in data:
            pairs.append(("note", data["note"]))
        if "since" in data:
            pairs.append(("since", iso(data["since"])))
        return details(pairs)

    state.emit(data, human)


@ip.command("reserve")
@click.argument("pool_name", metavar="POOL")
@click.argument("spec", metavar="RANGE")
@click.option("--note", default="", help="Why it is reserved.")
@json_option
@pass_state
def ip_reserve(state: State, pool_name: str, spec: str, note: str) -> None:
    """Reserve IP, A-B or CIDR in POOL so it is never allocated."""
    r = state.client.reserve(pool_name, spec, note=note)
    state.emit(r, lambda: f"reserved {r.get('range')} in pool {r.get('pool', pool_name)} "
                          f"({r.get('count')} address(es))")


@ip.command("unreserve")
@click.argument("pool_name", metavar="POOL")
@click.argument("spec", metavar="RANGE")
@json_option
@pass_state
def ip_unreserve(state: State, pool_name: str, spec: str) -> None:
    """Return reserved addresses of POOL in RANGE to free space."""
    data = state.client.unreserve(pool_name, spec)
    state.emit(data, lambda: f"freed {data.get('freed', 0)} address(es) in pool {pool_name}")


@ip.command("assign")
@click.argument("pool_name", metavar="POOL")
@click.argument("address", metavar="IP")
@click.option("--handle", required=True, metavar="NAME",
              help="Stable name; allocations with this handle always get IP.")
@click.option("--note", default="", help="Free text.")
@json_option
@pass_state
def ip_assign(state: State, pool_name: str, address: str, handle: str, note: str) -> None:
    """Bind IP in POOL to a handle (a fixed address)."""
    r = state.client.assign(pool_name, address, handle, note=note)
    state.emit(r, lambda: f"assigned {r.get('range', address)} in pool "
                          f"{r.get('pool', pool_name)} to handle {r.get('handle', handle)}")


@ip.command("allow")
@click.argument("address", metavar="IP")
@click.argument("extra", metavar="[ADDRESS]...", nargs=-1)
@click.option("--owner", "owner_id", required=True, metavar="CID",
              help="Container id that holds IP (refused when it does not).")
@click.option("--ifname", metavar="IF", help="The owner's interface.")
@click.option("--none", "clear", is_flag=True, help="Allow no extra address any more.")
@json_option
@pass_state
def ip_allow(state: State, address: str, extra: tuple[str, ...], owner_id: str,
             ifname: str | None, clear: bool) -> None:
    """Let the holder of IP also send from ADDRESS... (a VRRP address); replaces the list.

    Each ADDRESS inside a pool must be reserved there first (netctl ip reserve),
    so no container gets it. The agents' port guards follow within seconds.

    \b
      netctl ip reserve rack1 198.18.0.200 --note "VIP of db-0/db-1"
      netctl ip allow 198.18.0.60 198.18.0.200 --owner CID
      netctl ip allow 198.18.0.60 --owner CID --none
    """
    if clear == bool(extra):
        raise click.UsageError("give the addresses to allow, or --none")
    a = state.client.set_allowed(address, owner_id, list(extra), ifname=ifname)
    state.emit(a, lambda: f"{a.get('ip', address)} of {a.get('container_id', owner_id)} may "
                          f"also send from: {', '.join(a.get('allowed') or []) or 'nothing'}")


@ip.command("release")
@click.argument("address", metavar="[IP]", required=False)
@click.option("--pool", "pool_name", metavar="P", help="Only in pool P.")
@click.option("--owner", "owner_id", metavar="CID", help="Container id that holds the address(es).")
@click.option("--ifname", metavar="IF", help="Only the owner's interface IF.")
@click.option("--force", is_flag=True, help="Release IP whoever holds it (operator).")
@json_option
@pass_state
def ip_release(state: State, address: str | None, pool_name: str | None,
               owner_id: str | None, ifname: str | None, force: bool) -> None:
    """Release IP (its --owner or --force), or everything --owner holds.

    \b
      netctl ip release 10.0.0.5 --owner CID
      netctl ip release 10.0.0.5 --force
      netctl ip release --owner CID [--ifname eth0]
    """
    if address is None and owner_id is None:
        raise click.UsageError("name an IP or an --owner")
    if address is None and force:
        raise click.UsageError("--force applies to releasing an IP")
    data = state.client.release(pool=pool_name, container_id=owner_id, ifname=ifname,
                                ip=address, force=force)

    def human() -> str:
        lines = [f"released {a.get('ip')} (pool {a.get('pool')}) from "
                 f"{_owner_text(a)}" for a in data.get("released", [])]
        if not lines:
            lines.append(str(data.get("message") or "nothing released"))
        return "\n".join(lines)

    state.emit(data, human)


def _owner_text(a: dict[str, Any]) -> str:
    return owner(a.get("container_id"), a.get("ifname"))


@ip.command("history")
@click.argument("address", metavar="IP")
@click.option("--limit", type=click.IntRange(1, 10000), default=100, show_default=True,
              help="At most N events, the most recent.")
@json_option
@pass_state
def ip_history(state: State, address: str, limit: int) -> None:
    """Events of one address, oldest first."""
    data = state.client.history(address, limit=limit)
    state.emit(data, lambda: table(
        ["TIME", "ACTION", "OWNER", "HOST", "MAC", "ACTOR", "NOTE"],
        ([iso(e.get("ts")), e.get("action"), owner(e.get("container_id"), e.get("ifname")),
          e.get("host"), e.get("mac"), e.get("actor"), e.get("note")]
         for e in data.get("events", []))))


# --- hosts and gc ---------------------------------------------------------------


@cli.group()
def host() -> None:
    """Hosts that hold allocations or blocks."""


@host.command("list")
@json_option
@pass_state
def host_list(state: State) -> None:
    """List hosts with their allocation and block counts."""
    data = state.client.hosts()
    state.emit(data, lambda: table(
        ["HOST", "ALLOCATIONS", "BLOCKS", "POOLS"],
        ([h.get("host"), h.get("allocations"), h.get("blocks"), kv(h.get("pools"))]
         for h in data.get("hosts", []))))


class NotYet(click.ClickException):
    """A command whose machinery has not arrived yet: exits like a usage error."""

    exit_code = EXIT_USAGE


@cli.command("gc")
@click.option("--dry-run", is_flag=True, help="Only list what would be repaired.")
def gc(dry_run: bool) -> None:
    """Find and repair leaked addresses (arrives with the host agent)."""
    raise NotYet(
        "gc is not available yet: finding leaked addresses needs the host agent, which "
        "knows which containers still exist; until then use 'netctl ip list --host H' and "
        "'netctl ip release IP --force'")


# --- entry point ----------------------------------------------------------------


def _fail(message: str, code: int) -> int:
    click.echo(f"netctl: error: {escape(' '.join(message.split()))}", err=True)
    return code


def run(argv: Sequence[str] | None = None) -> int:
    """Run netctl and return its exit code (no sys.exit: tests call this)."""
    try:
        rv = cli.main(args=list(argv) if argv is not None else None, prog_name="netctl",
                      standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        return EXIT_USAGE
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return _fail(exc.format_message() + hint, EXIT_USAGE)
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        return _fail("aborted", 130)
    except NetdError as exc:
        return _fail(exc.message, exit_code_for(exc))
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    return rv if isinstance(rv, int) else EXIT_OK


def main() -> None:
    """Console script ``netctl``."""
    sys.exit(run())
