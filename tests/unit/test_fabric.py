"""``netd fabric config``: the FRR configurations, pure (FRR itself parses them in
tests/integration/test_fabric_frr.py)."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from netd.bgp.fabric import configs, parse_fabric
from netd.errors import InvalidInput

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "fabric.toml"


def example() -> dict[str, Any]:
    with EXAMPLE.open("rb") as f:
        return tomllib.load(f)


def test_the_example_gives_a_core_and_a_file_per_tor() -> None:
    files = configs(parse_fabric(example()))
    assert sorted(files) == ["core.conf", "tor-r1.conf", "tor-r2a.conf", "tor-r2b.conf"]


def test_tors_listen_for_their_hosts_and_never_originate_a_default() -> None:
    files = configs(parse_fabric(example()))
    tor = files["tor-r1.conf"]
    assert "router bgp 65001" in tor and " neighbor HOSTS remote-as 64512" in tor
    assert " bgp listen range 198.18.1.0/24 peer-group HOSTS" in tor
    assert " neighbor 10.254.1.0 remote-as 65000" in tor  # the core's end of the /31
    for name, text in files.items():
        if name != "core.conf":
            assert "default-originate" not in text, name
    # hosts get the default and /32s only; they may send anything but a default
    assert "ip prefix-list NETD-TO-HOSTS seq 10 permit 0.0.0.0/0\n" in tor
    assert "ip prefix-list NETD-TO-HOSTS seq 20 permit 0.0.0.0/0 ge 32" in tor
    assert "permit 0.0.0.0/0 ge 1 le 32" in tor
    assert " bgp graceful-restart restart-time 120" in tor


def test_the_core_originates_the_default_and_sends_longer_than_a_block_down() -> None:
    core = configs(parse_fabric(example()))["core.conf"]
    assert "  neighbor TORS default-originate" in core
    assert "  neighbor TORS as-override" in core  # the ToRs share an AS
    assert "permit 0.0.0.0/0 ge 27 le 32" in core  # block_prefix 26
    for tor in ("10.254.1.1", "10.254.2.1", "10.254.2.3"):
        assert f" neighbor {tor} peer-group TORS" in core


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node: Any = out
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    last = keys[-1]
    if value is KeyError:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return out


@pytest.mark.parametrize(("path", "value", "why"), [
    ("tor_asn", 64512, "must differ"),
    ("core_asn", 0, "AS number"),
    ("block_prefix", 8, "block_prefix"),
    ("restart_time", 0, "restart_time"),
    ("core", {}, "router_id"),
    ("racks", [], "at least one"),
    ("racks.1.hosts", "198.18.1.128/25", "overlaps"),
    ("racks.1.hosts", "nonsense", "IPv4 subnet"),
    ("racks.0.tors.0.core_link", "10.254.1.0/24", "/30 or /31"),
    ("racks.1.tors.1.name", "tor-r2a", "used twice"),
    ("racks.1.tors.1.core_link", "10.254.2.0/31", "used twice"),
    ("racks.0.name", "r 1", "letters"),
    ("core.router_id", "::1", "IPv4"),
    ("speaker", "bird", "unknown keys"),
])
def test_bad_descriptions_are_refused(path: str, value: Any, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        parse_fabric(_set(example(), path, value))
