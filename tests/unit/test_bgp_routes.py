"""The BGP speaker's pure stages: exabgp's configuration and commands, its events (the
lines below were captured from exabgp 5 against FRR 8.4 bgpd), and the routes the
host installs from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from netd.bgp.driver import BgpSettings, Peer, parse_bgp_settings
from netd.bgp.exabgp import (
    BATCH,
    announce,
    end_of_rib,
    parse_line,
    render_config,
    withdraw,
)
from netd.bgp.routes import RibIn, announcements, wanted

CAPTURED = Path(__file__).parent / "data" / "exabgp5_frr84_events.txt"


def test_the_configuration_has_gr_route_refresh_and_manual_eor() -> None:
    s = parse_bgp_settings({"asn": 64512, "restart_time": 90, "router_id": "198.18.1.11",
                            "peers": [{"address": "198.18.1.1", "asn": 65001},
                                      {"address": "198.18.1.2", "asn": 65001}]})
    text = render_config(s, ["/usr/bin/python3", "-m", "netd.bgp.relay", "/run/x.sock"],
                         router_id="198.18.1.11", local_address="198.18.1.11")
    assert "run /usr/bin/python3 -m netd.bgp.relay /run/x.sock;" in text
    assert text.count("neighbor 198.18.1.") == 2
    for line in ("local-as 64512;", "peer-as 65001;", "manual-eor true;",
                 "graceful-restart 90; route-refresh;", "encoder json;",
                 "local-address 198.18.1.11;", "router-id 198.18.1.11;"):
        assert line in text
    with pytest.raises(ValueError):
        render_config(BgpSettings(peers=(Peer("198.18.1.1", 65001),)), ["x"],
                      router_id="198.18.1.11")


def test_commands_are_batched_and_sorted() -> None:
    prefixes = [f"10.{i // 256}.{i % 256}.0/24" for i in range(BATCH + 10)]
    cmds = announce(reversed(prefixes))
    assert len(cmds) == 2
    assert cmds[0].startswith("announce attributes next-hop self nlri 10.0.0.0/24 10.0.1.0/24")
    assert len(cmds[0].split("nlri ")[1].split()) == BATCH
    assert withdraw(["10.65.0.64/26"], neighbor="198.18.1.1") == [
        "neighbor 198.18.1.1 withdraw attributes next-hop self nlri 10.65.0.64/26"]
    assert announce([]) == []
    assert end_of_rib("198.18.1.1") == "neighbor 198.18.1.1 announce eor ipv4 unicast"


def test_captured_exabgp_lines_decode() -> None:
    events = [parse_line(line) for line in CAPTURED.read_text().splitlines()]
    kinds = [e.kind for e in events]
    assert kinds.count("ack") == 3 and [e.ok for e in events if e.kind == "ack"] == [
        True, True, False]  # the bare words: done, done, error
    states = [e.state for e in events if e.kind == "state"]
    assert states == ["connected", "up"]
    assert all(e.peer == "10.9.0.2" for e in events if e.kind != "ack")
    updates = [e for e in events if e.kind == "update"]
    assert updates[0].announced == {"10.200.0.0/24": "10.9.0.2"}
    # FRR reflected our own two blocks back, then the withdrawal of one
    assert updates[1].announced == {"10.65.0.0/26": "10.9.0.2", "10.65.0.64/26": "10.9.0.2"}
    assert updates[2].withdrawn == {"10.65.0.64/26"}
    assert "eor" in kinds
    assert parse_line("not json").kind == "other"


def test_the_default_through_every_tor_exceptions_in_own_blocks_never_own_routes() -> None:
    tor1 = RibIn(True, {"0.0.0.0/0": "198.18.1.1", "10.65.0.0/26": "198.18.1.1",
                        "10.65.0.7/32": "198.18.1.1", "10.65.9.9/32": "198.18.1.1",
                        "10.66.0.0/24": "198.18.1.1"})
    tor2 = RibIn(True, {"0.0.0.0/0": "198.18.1.2", "10.65.0.7/32": "198.18.1.2"})
    got = wanted({"198.18.1.1": tor1, "198.18.1.2": tor2}, own_blocks=["10.65.0.0/26"],
                 own_announced=["10.65.0.0/26"])
    assert got.default == ("198.18.1.1", "198.18.1.2")  # ECMP
    assert dict(got.exceptions) == {"10.65.0.7/32": ("198.18.1.1", "198.18.1.2")}
    # our own /32 (a borrowed address we announce) reflected back is never installed
    got = wanted({"198.18.1.1": tor1}, own_blocks=["10.65.0.0/26"],
                 own_announced=["10.65.0.0/26", "10.65.0.7/32"])
    assert dict(got.exceptions) == {}


def test_a_rib_follows_updates_and_keeps_stale_routes_when_down() -> None:
    r = RibIn()
    for line in CAPTURED.read_text().splitlines():
        r.apply(parse_line(line))
    assert r.up and r.routes == {"10.200.0.0/24": "10.9.0.2", "10.65.0.0/26": "10.9.0.2"}
    r.apply(parse_line('{"type": "state", "neighbor": {"address": {"peer": "10.9.0.2"}, '
                       '"state": "down", "reason": "x"}}'))
    assert not r.up and r.routes  # kept until the restart timer says otherwise


def test_announcements_are_blocks_and_borrowed_addresses() -> None:
    assert announcements(["10.65.0.0/26"], ["10.65.0.10/32", "10.65.3.4", "10.65.0.11"]) \
        == {"10.65.0.0/26", "10.65.3.4/32"}


def test_a_down_peer_counts_for_its_restart_time_only() -> None:
    tor = RibIn()
    tor.apply(parse_line('{"type": "state", "neighbor": {"address": {"peer": "p"}, '
                         '"state": "up"}}'), now=0.0)
    tor.routes["0.0.0.0/0"] = "198.18.1.1"
    tor.apply(parse_line('{"type": "state", "neighbor": {"address": {"peer": "p"}, '
                         '"state": "down"}}'), now=100.0)
    assert wanted({"p": tor}, [], [], now=150.0, stale_after=120).default == ("198.18.1.1",)
    assert wanted({"p": tor}, [], [], now=221.0, stale_after=120).default == ()
