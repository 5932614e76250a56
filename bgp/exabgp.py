"""exabgp 5 as the host's BGP speaker: its configuration, the commands, its events (pure).

The agent drives exabgp through its process API: exabgp runs one process of
ours (:mod:`netd.bgp.relay`) whose stdout are commands and whose stdin are
exabgp's events and answers. Measured gotchas this module encodes:

* acks are bare words (``done`` / ``error``) even with the JSON encoder, so
  :func:`parse_line` tells them apart from JSON events;
* announcements go in batches (``attributes next-hop self nlri A B C``: ~2,000
  prefixes/s against ~1,000/s one per line);
* ``manual-eor``: after a restart the agent re-announces everything and only
  then sends End-of-RIB, per peer (with exabgp's automatic End-of-RIB, every
  route was withdrawn 3.4 s after a kill -9, measured with FRR);
* the peers reflect the host's own routes back (seen with FRR: our /26 came
  back with AS path ``65001 64512``); :mod:`netd.bgp.routes` never installs them.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .driver import BgpSettings

PROCESS = "netd"
BATCH = 500  # prefixes per command (exabgp reads a line at a time)


def render_config(s: BgpSettings, run: Sequence[str], *, router_id: str,
                  local_address: str | None = None) -> str:
    """The exabgp configuration: one neighbor per peer, graceful restart with
    ``restart_time``, route refresh, manual End-of-RIB, our process."""
    if s.asn is None:
        raise ValueError("[bgp] asn is needed to speak BGP")
    argv = " ".join(run)
    out = [f"process {PROCESS} {{", f"  run {argv};", "  encoder json;", "}", ""]
    for p in s.peers:
        out += [f"neighbor {p.address} {{",
                f"  router-id {router_id};",
                *([f"  local-address {local_address};"] if local_address else []),
                f"  local-as {s.asn};",
                f"  peer-as {p.asn};",
                f"  hold-time {s.hold_time};",
                "  manual-eor true;",
                f"  capability {{ graceful-restart {s.restart_time}; route-refresh; }}",
                f"  api {{ processes [ {PROCESS} ]; receive {{ parsed; update; }} "
                "neighbor-changes; }",
                "}", ""]
    return "\n".join(out)


def _batches(prefixes: Iterable[str]) -> list[list[str]]:
    items = sorted({str(ipaddress.ip_network(p)) for p in prefixes},
                   key=lambda p: (ipaddress.ip_network(p).version,
                                  ipaddress.ip_network(p)))
    return [items[i:i + BATCH] for i in range(0, len(items), BATCH)]


def announce(prefixes: Iterable[str], *, neighbor: str | None = None) -> list[str]:
    """``announce attributes next-hop self nlri ...`` commands, in batches."""
    head = f"neighbor {neighbor} " if neighbor else ""
    return [f"{head}announce attributes next-hop self nlri {' '.join(b)}"
            for b in _batches(prefixes)]


def withdraw(prefixes: Iterable[str], *, neighbor: str | None = None) -> list[str]:
    head = f"neighbor {neighbor} " if neighbor else ""
    return [f"{head}withdraw attributes next-hop self nlri {' '.join(b)}"
            for b in _batches(prefixes)]


def end_of_rib(neighbor: str) -> str:
    return f"neighbor {neighbor} announce eor ipv4 unicast"


@dataclass
class Event:
    """One line from exabgp: an ack (``done``/``error``), a session state, an update."""

    kind: str  # "ack", "state", "update", "eor", "other"
    ok: bool = True  # an ack's verdict
    peer: str = ""
    state: str = ""  # connected, up, down
    reason: str = ""
    announced: dict[str, str] = field(default_factory=dict)  # prefix -> next hop
    withdrawn: set[str] = field(default_factory=set)


def parse_line(line: str) -> Event:
    """Tell a bare-word ack from a JSON event and decode what the agent uses."""
    text = line.strip()
    if text in ("done", "error"):
        return Event("ack", ok=text == "done")
    try:
        doc = json.loads(text)
    except ValueError:
        return Event("other")
    if not isinstance(doc, dict):
        return Event("other")
    neighbor = doc.get("neighbor") or {}
    peer = str((neighbor.get("address") or {}).get("peer", ""))
    kind = doc.get("type")
    if kind == "state":
        return Event("state", peer=peer, state=str(neighbor.get("state", "")),
                     reason=str(neighbor.get("reason", "")))
    if kind != "update":
        return Event("other", peer=peer)
    message = neighbor.get("message") or {}
    if "eor" in message:
        return Event("eor", peer=peer)
    update = message.get("update") or {}
    ev = Event("update", peer=peer)
    for family, by_nexthop in (update.get("announce") or {}).items():
        if family != "ipv4 unicast" or not isinstance(by_nexthop, dict):
            continue
        for nexthop, nlris in by_nexthop.items():
            for n in nlris or []:
                if isinstance(n, dict) and "nlri" in n:
                    ev.announced[str(ipaddress.ip_network(n["nlri"]))] = str(nexthop)
    for family, nlris in (update.get("withdraw") or {}).items():
        if family != "ipv4 unicast":
            continue
        for n in nlris or []:
            if isinstance(n, dict) and "nlri" in n:
                ev.withdrawn.add(str(ipaddress.ip_network(n["nlri"])))
    return ev


__all__ = ["BATCH", "PROCESS", "Event", "announce", "end_of_rib", "parse_line",
           "render_config", "withdraw"]
