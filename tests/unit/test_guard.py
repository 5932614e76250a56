"""Port guard rules (pure) and the group commit of guard changes, with a fake nftables.

What the rules do to real frames (each attack blocked, the owner's traffic through)
is tests/integration/test_l2_guard.py."""

from __future__ import annotations

import threading
import time

import pytest

from netd.dataplane.errors import DataplaneError
from netd.dataplane.guard import GuardTable, PortGuard, eui64_link_local, render_install


def test_eui64_link_local() -> None:
    assert eui64_link_local("0a:58:c6:12:00:32") == "fe80::858:c6ff:fe12:32"


def test_an_ipv4_container_guard_has_no_sets() -> None:
    """One-value matches are plain comparisons: anonymous sets double a guard's cost."""
    g = PortGuard("ndv0123456789ab", "0a:58:c6:12:00:32", ("198.18.0.50",), "c1/eth0")
    rules = g.rules()
    assert not any("{" in r for r in rules), rules
    assert rules[0] == "ether saddr != 0a:58:c6:12:00:32 drop"
    assert "ip saddr != 198.18.0.50 drop" in rules
    assert "arp saddr ip != 198.18.0.50 drop" in rules
    assert "ip6 saddr != fe80::858:c6ff:fe12:32 drop" in rules
    assert rules[-1] == "drop"
    # probes and duplicate address detection come before the address checks
    assert rules.index("arp saddr ip 0.0.0.0 accept") < rules.index(
        "arp saddr ip != 198.18.0.50 drop")


def test_allowed_addresses_make_sets() -> None:
    g = PortGuard("ndv0123456789ab", "0a:58:c6:12:00:32",
                  ("198.18.0.50", "198.18.0.200", "2001:db8::5"), "c1/eth0")
    rules = g.rules()
    assert "ip saddr != { 198.18.0.50, 198.18.0.200 } drop" in rules
    assert "ip6 saddr != { 2001:db8::5, fe80::858:c6ff:fe12:32 } drop" in rules


def test_the_script_carries_the_owner_and_digest_and_nothing_unquoted() -> None:
    g = PortGuard("ndv0123456789ab", "0a:58:c6:12:00:32", ("198.18.0.50",),
                  'c1"; flush ruleset; "/eth0')
    script = render_install("br0", g)
    assert "flush ruleset" not in script  # spaces and quotes are taken out of the owner
    assert g.comment().startswith("netd " + g.digest())
    assert '"' not in g.comment()
    with pytest.raises(ValueError):
        PortGuard("bad name; x", "0a:58:c6:12:00:32", ("198.18.0.50",))


class SlowNft:
    """Records each transaction; the first takes a while, so others queue behind it."""

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.lock = threading.Lock()

    def run(self, script: str) -> str:
        with self.lock:
            self.runs.append(script)
            first = len(self.runs) == 1
        if first:
            time.sleep(0.2)
        if "bad" in script:
            raise DataplaneError("Error: no such chain")
        return ""

    def json(self, command: str) -> list[dict[str, object]]:
        return []

    def close(self) -> None:
        pass


def test_changes_at_the_same_time_are_committed_together_and_fail_alone() -> None:
    nft = SlowNft()
    table = GuardTable("br0", nft=nft)  # type: ignore[arg-type]
    table._ready = True  # the table exists (ensure() is tested against real nftables)
    errors: dict[int, Exception] = {}

    def change(n: int) -> None:
        try:
            table._apply(f"change {n}{' bad' if n == 5 else ''}\n")
        except DataplaneError as exc:
            errors[n] = exc

    first = threading.Thread(target=change, args=(0,))
    first.start()
    time.sleep(0.05)  # the first transaction is running; these queue behind it
    rest = [threading.Thread(target=change, args=(n,)) for n in range(1, 10)]
    for t in rest:
        t.start()
    for t in (first, *rest):
        t.join(5)
    assert list(errors) == [5]  # only the bad change's caller fails
    # 1 alone, then 9 together (which fail because of one), then each of the 9 alone
    assert len(nft.runs) == 1 + 1 + 9
    assert nft.runs[1].count("change") == 9
