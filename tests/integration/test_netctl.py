"""``netctl`` end to end: the installed console script against a real server process.

Allocations (which only the agent makes) go through the Python client, the
same one netctl uses. Every failing command must exit with its documented
code, print exactly one ``netctl: error:`` line and leave the store unchanged.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from netd.ipam.client import Client
from tests.conftest import Server, bin_path, every_event, free_port

pytestmark = pytest.mark.real


def run(server: Server | None, *args: str, token: str | None = None,
        env: dict[str, str] | None = None, url: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run the installed netctl; token defaults to the server's own."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NETD_")}
    full_env["USER"] = "alice"
    full_env.update(env or {})
    cmd = [bin_path("netctl")]
    if url is not None or server is not None:
        cmd += ["--server", url or server.url]  # type: ignore[union-attr]
    if token is None and server is not None and "NETD_TOKEN" not in full_env:
        token = server.token
    if token:
        cmd += ["--token", token]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=full_env,
                          timeout=60)


def ok(server: Server, *args: str, **kw: Any) -> str:
    res = run(server, *args, **kw)
    assert res.returncode == 0, f"netctl {' '.join(args)} -> {res.returncode}: {res.stderr}"
    assert res.stderr == ""
    return res.stdout


def js(server: Server, *args: str) -> Any:
    return json.loads(ok(server, "--json", *args))


def fails(server: Server | None, code: int, *args: str, **kw: Any) -> str:
    """Assert exit ``code``, one error line on stderr, nothing on stdout; return the line."""
    res = run(server, *args, **kw)
    assert res.returncode == code, (
        f"netctl {' '.join(args)}: want {code}, got {res.returncode}: {res.stderr}{res.stdout}")
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, f"netctl {' '.join(args)}: not one line: {res.stderr!r}"
    assert lines[0].startswith("netctl: error: "), lines[0]
    return lines[0]


def snapshot(server: Server) -> dict[str, Any]:
    """Everything an operator can see: pools, addresses and the whole event log."""
    auth = {"Authorization": f"Bearer {server.token}"}
    events = every_event(lambda path, **kw: httpx.get(f"{server.url}{path}", headers=auth,
                                                      **kw))
    return {"pools": js(server, "pool", "list"),
            "addresses": json.loads(ok(server, "ip", "list", "--json")),  # --json after too
            "hosts": js(server, "host", "list"),
            "events": events}


def agent(server: Server, host: str = "h1") -> Client:
    return Client(server.url, token=server.token, actor=f"agent:{host}")


def columns(header: str) -> dict[str, int]:
    return {m.group(0): m.start() for m in re.finditer(r"\S+", header)}


def row_of(out: str, first: str) -> str:
    return next(line for line in out.splitlines() if line.split()[0] == first)


# --- pools -------------------------------------------------------------------


def test_pool_create_list_show(server: Server) -> None:
    created = js(server, "pool", "create", "web", "--cidr", "10.10.0.0/24", "--vlan", "100",
                 "--mode", "vlan", "--label", "team=payments", "--label", "env=prod",
                 "--reserve", "10.10.0.2-10.10.0.9", "--route", "0.0.0.0/0",
                 "--route", "192.168.0.0/16,via=10.10.0.254", "--dns-server", "10.0.0.53",
                 "--dns-search", "corp.example", "--dns-domain", "corp.example")
    assert created["name"] == "web"
    assert created["cidr"] == "10.10.0.0/24"
    assert created["gateway"] == "10.10.0.1"
    assert created["vlan"] == 100
    assert created["mode"] == "vlan"
    assert created["labels"] == {"team": "payments", "env": "prod"}
    assert {"dst": "192.168.0.0/16", "gw": "10.10.0.254"} in created["routes"]
    assert created["dns"]["nameservers"] == ["10.0.0.53"]
    assert created["dns"]["search"] == ["corp.example"]
    assert (created["size"], created["reserved"], created["free"]) == (254, 9, 245)

    out = ok(server, "pool", "create", "db", "--cidr", "10.11.0.0/24", "--gateway", "10.11.0.254")
    assert out == "created pool db: 10.11.0.0/24 gateway 10.11.0.254 mode l2\n"

    table = ok(server, "pool", "list")
    header, *rows = table.splitlines()
    assert header.split() == ["NAME", "CIDR", "GATEWAY", "VLAN", "MODE", "FREE", "RESERVED",
                              "ALLOCATED", "UTIL(%)", "LABELS"]
    assert [r.split()[0] for r in rows] == ["db", "web"]
    web = row_of(table, "web").split()
    assert web == ["web", "10.10.0.0/24", "10.10.0.1", "100", "vlan", "245", "9", "0", "3.5",
                   "env=prod,team=payments"]
    assert row_of(table, "db").split()[3] == "-"
    cols = columns(header)  # aligned: every cell starts (or, numbers, ends) under its header
    for row in rows:
        assert row[cols["CIDR"]:].startswith("10.1")
        assert row[cols["LABELS"]:] in ("-", "env=prod,team=payments")
        assert row[:cols["UTIL(%)"] + len("UTIL(%)")].endswith(("3.5", "0.4"))

    listed = js(server, "pool", "list")
    assert [p["name"] for p in listed["pools"]] == ["db", "web"]
    raw = ok(server, "--json", "pool", "list")
    assert raw.startswith('{\n  "pools": [\n')  # indent 2, stable shape

    shown = ok(server, "pool", "show", "web")
    assert re.search(r"^cidr:\s+10\.10\.0\.0/24$", shown, re.M)
    assert re.search(r"^vlan:\s+100$", shown, re.M)
    assert re.search(r"^routes:\s+0\.0\.0\.0/0, 192\.168\.0\.0/16 via 10\.10\.0\.254$", shown,
                     re.M)
    assert re.search(r"^10\.10\.0\.2-10\.10\.0\.9\s+8\s+-\s+reserved at pool creation", shown,
                     re.M)
    assert re.search(r"^10\.10\.0\.1\s+1\s+-\s+gateway", shown, re.M)
    assert "Blocks:" not in shown
    detail = js(server, "pool", "show", "web")
    assert detail["pool"]["name"] == "web"
    assert [r["range"] for r in detail["reserved"]] == ["10.10.0.1", "10.10.0.2-10.10.0.9"]
    assert detail["blocks"] == []


def test_generated_pools_get_distinct_subnets_and_vlans(server: Server) -> None:
    args = ["--from", "10.20.0.0/16", "--prefix-len", "24", "--vlan", "auto",
            "--vlan-range", "200-210", "--mode", "vlan"]
    a = js(server, "pool", "create", "gen-a", *args)
    b = js(server, "pool", "create", "gen-b", *args)
    assert (a["cidr"], b["cidr"]) == ("10.20.0.0/24", "10.20.1.0/24")
    assert (a["vlan"], b["vlan"]) == (200, 201)
    out = ok(server, "pool", "create", "gen-c", *args)
    assert out == "created pool gen-c: 10.20.2.0/24 gateway 10.20.2.1 vlan 202 mode vlan\n"


def test_bgp_pool_show_lists_host_blocks(server: Server) -> None:
    ok(server, "pool", "create", "rack1", "--cidr", "10.30.0.0/24", "--mode", "bgp",
       "--block-prefix", "28")
    with agent(server, "h2") as c:
        c.allocate("rack1", "cid-b", host="h2")
    shown = ok(server, "pool", "show", "rack1")
    assert re.search(r"^block prefix:\s+28$", shown, re.M)
    assert re.search(r"^Blocks:\nCIDR\s+HOST\n10\.30\.0\.0/28\s+h2$", shown, re.M)
    assert js(server, "pool", "show", "rack1")["blocks"] == [
        {"pool": "rack1", "cidr": "10.30.0.0/28", "host": "h2"}]
    hosts = ok(server, "host", "list")
    assert hosts.splitlines()[0].split() == ["HOST", "ALLOCATIONS", "BLOCKS", "POOLS"]
    assert row_of(hosts, "h2").split() == ["h2", "1", "1", "rack1=1"]


def test_pool_delete_refused_with_allocations_then_forced(server: Server) -> None:
    ok(server, "pool", "create", "web", "--cidr", "10.10.0.0/24")
    ok(server, "pool", "create", "empty", "--cidr", "10.12.0.0/24")
    with agent(server) as c:
        c.allocate("web", "cid1", host="h1")
    before = snapshot(server)
    line = fails(server, 4, "pool", "delete", "web")
    assert "1 allocated address" in line and "--force" in line
    assert snapshot(server) == before
    assert ok(server, "pool", "delete", "empty") == "deleted pool empty\n"
    out = js(server, "pool", "delete", "web", "--force")
    assert out == {"deleted": "web", "dropped_allocations": 1}
    assert js(server, "pool", "list") == {"pools": []}
    assert js(server, "ip", "list") == {"allocated": [], "reserved": []}
    fails(server, 3, "pool", "show", "web")


# --- addresses ---------------------------------------------------------------


def test_ip_lifecycle(server: Server) -> None:
    ok(server, "pool", "create", "web", "--cidr", "10.10.0.0/24")
    ok(server, "pool", "create", "v6", "--cidr", "2001:db8:1::/64")
    with agent(server) as c:
        a1 = c.allocate("web", "cid1", host="h1",
                        labels={"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "api-0"})
        a2 = c.allocate("web", "cid1", ifname="eth1", host="h1",
                        labels={"container_name": "sidecar"})
        a3 = c.allocate("v6", "cid3", host="h3")
    assert (a1["ip"], a2["ip"], a3["ip"]) == ("10.10.0.2", "10.10.0.3", "2001:db8:1::2")

    # reserve / unreserve
    out = ok(server, "ip", "reserve", "web", "10.10.0.100-10.10.0.119", "--note", "load balancers")
    assert out == "reserved 10.10.0.100-10.10.0.119 in pool web (20 address(es))\n"
    assert js(server, "ip", "show", "10.10.0.105")["state"] == "reserved"
    assert ok(server, "ip", "unreserve", "web", "10.10.0.110-10.10.0.200") == (
        "freed 10 address(es) in pool web\n")
    assert js(server, "ip", "show", "10.10.0.115")["state"] == "free"

    # assign a fixed address; an allocation with the handle gets it
    out = ok(server, "ip", "assign", "web", "10.10.0.50", "--handle", "db-0", "--note", "primary")
    assert out == "assigned 10.10.0.50 in pool web to handle db-0\n"
    shown = ok(server, "ip", "show", "10.10.0.50")
    assert re.search(r"^state:\s+reserved$", shown, re.M)
    assert re.search(r"^handle:\s+db-0$", shown, re.M)
    with agent(server, "h2") as c:
        assert c.allocate("web", "cid-db", host="h2", handle="db-0")["ip"] == "10.10.0.50"

    # list: table and JSON, filters
    table = ok(server, "ip", "list")
    header = table.splitlines()[0]
    assert header.split() == ["POOL", "IP", "MAC", "STATE", "OWNER", "HOST", "HANDLE", "LABELS"]
    assert row_of(table, "web").split()[1] == "10.10.0.1"  # sorted by address, gateway first
    rows = [line.split() for line in table.splitlines()[1:]]
    assert ["web", "10.10.0.2", a1["mac"], "allocated", "cid1/eth0", "h1", "-",
            "default/api-0"] in rows
    assert ["web", "10.10.0.3", a2["mac"], "allocated", "cid1/eth1", "h1", "-", "sidecar"] in rows
    assert ["web", "10.10.0.50", ok_mac(server, "10.10.0.50"), "allocated", "cid-db/eth0", "h2",
            "db-0", "-"] in rows
    assert ["v6", "2001:db8:1::2", a3["mac"], "allocated", "cid3/eth0", "h3", "-", "-"] in rows
    assert any(r[:4] == ["web", "10.10.0.100-10.10.0.109", "-", "reserved"] for r in rows)
    cols = columns(header)
    for line in table.splitlines()[1:]:
        assert line[cols["STATE"]:].startswith(("allocated", "reserved"))

    only_h1 = js(server, "ip", "list", "--host", "h1")
    assert [a["ip"] for a in only_h1["allocated"]] == ["10.10.0.2", "10.10.0.3"]
    assert only_h1["reserved"] == []
    reserved = js(server, "ip", "list", "--pool", "web", "--state", "reserved")
    assert reserved["allocated"] == []
    assert [r["range"] for r in reserved["reserved"]] == [
        "10.10.0.1", "10.10.0.50", "10.10.0.100-10.10.0.109"]
    allocated = js(server, "ip", "list", "--state", "allocated")
    assert [a["ip"] for a in allocated["allocated"]] == [
        "2001:db8:1::2", "10.10.0.2", "10.10.0.3", "10.10.0.50"]  # by pool name, then address

    hosts = ok(server, "host", "list")
    assert row_of(hosts, "h1").split() == ["h1", "2", "0", "web=2"]
    assert js(server, "host", "list")["hosts"][0]["host"] == "h1"

    # release: another owner releases nothing, no owner is refused, --force works
    assert ok(server, "ip", "release", "10.10.0.2", "--owner", "someone-else") == (
        "10.10.0.2 is held by another owner; not released\n")
    assert js(server, "ip", "show", "10.10.0.2")["state"] == "allocated"
    assert ok(server, "ip", "release", "10.10.0.2", "--force") == (
        "released 10.10.0.2 (pool web) from cid1/eth0\n")
    assert ok(server, "ip", "release", "--owner", "cid1", "--ifname", "eth1") == (
        "released 10.10.0.3 (pool web) from cid1/eth1\n")
    released = js(server, "ip", "release", "--pool", "v6", "2001:db8:1::2", "--owner", "cid3")
    assert [a["ip"] for a in released["released"]] == ["2001:db8:1::2"]
    assert js(server, "ip", "release", "--owner", "cid1")["released"] == []

    # history: oldest first, with the actors
    hist = ok(server, "ip", "history", "10.10.0.2")
    header, *lines = hist.splitlines()
    assert header.split() == ["TIME", "ACTION", "OWNER", "HOST", "MAC", "ACTOR", "NOTE"]
    assert [line.split()[1:] for line in lines] == [
        ["pool-create", "-", "-", "-", "netctl:alice", "gateway", "10.10.0.1"],
        ["allocate", "cid1/eth0", "h1", a1["mac"], "agent:h1", "-"],
        ["release", "cid1/eth0", "h1", a1["mac"], "netctl:alice", "-"],
    ]
    assert all(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line) for line in lines)
    events = js(server, "ip", "history", "10.10.0.2", "--limit", "1")["events"]
    assert [e["action"] for e in events] == ["release"]
    assert [e["action"] for e in js(server, "ip", "history", "10.10.0.50")["events"]] == [
        "pool-create", "assign", "allocate"]


def test_ip_list_pages_through_every_pool(server: Server) -> None:
    """More allocations than one API page (1000), in pools whose names and subnets
    sort in opposite orders: every allocation is listed exactly once."""
    ok(server, "pool", "create", "a-big", "--cidr", "10.8.0.0/21")
    ok(server, "pool", "create", "b-small", "--cidr", "10.1.0.0/24")
    with agent(server, "h9") as c:
        for i in range(1003):
            c.allocate("a-big", f"c{i}", host="h9")
        for i in range(3):
            c.allocate("b-small", f"s{i}", host="h9")
    listed = js(server, "ip", "list", "--state", "allocated")["allocated"]
    keys = [(a["pool"], a["ip"]) for a in listed]
    assert len(keys) == len(set(keys)) == 1006
    assert [k for k in keys if k[0] == "b-small"] == [
        ("b-small", "10.1.0.2"), ("b-small", "10.1.0.3"), ("b-small", "10.1.0.4")]
    table = ok(server, "ip", "list", "--host", "h9")
    assert len(table.splitlines()) == 1 + 1006
    assert row_of(ok(server, "host", "list"), "h9").split() == [
        "h9", "1006", "0", "a-big=1003,b-small=3"]


def ok_mac(server: Server, ip: str) -> str:
    mac = js(server, "ip", "show", ip)["mac"]
    assert isinstance(mac, str)
    return mac


def test_show_free_and_unusable(server: Server) -> None:
    ok(server, "pool", "create", "web", "--cidr", "10.10.0.0/24")
    assert js(server, "ip", "show", "10.10.0.77") == {
        "ip": "10.10.0.77", "pool": "web", "cidr": "10.10.0.0/24", "state": "free"}
    out = ok(server, "ip", "show", "10.10.0.255")
    assert re.search(r"^state:\s+unusable$", out, re.M)


# --- failures: exit code, one line, nothing changed -----------------------------


BAD = [
    # (exit code, argv, part of the message)
    (4, ["pool", "create", "web", "--cidr", "10.10.0.0/24"], "already exists"),
    (4, ["pool", "create", "other", "--cidr", "10.10.0.128/25"], "overlaps"),
    (5, ["pool", "create", "other", "--cidr", "10.0.0.300/24"], "invalid CIDR"),
    (5, ["pool", "create", "other", "--cidr", "10.0.0.1/24"], "invalid CIDR"),
    (5, ["pool", "create", "Bad_Name", "--cidr", "10.40.0.0/24"], "invalid pool name"),
    (5, ["pool", "create", "other", "--cidr", "10.40.0.0/24", "--gateway", "10.41.0.1"],
     "outside"),
    (5, ["pool", "create", "other", "--cidr", "10.40.0.0/24", "--vlan-range", "300-200"],
     "ends before it starts"),
    (5, ["pool", "create", "other", "--cidr", "10.40.0.0/24", "--block-prefix", "28"], "bgp"),
    (5, ["pool", "create", "other", "--cidr", "10.40.0.0/24", "--route", "nowhere"], "nowhere"),
    (5, ["pool", "create", "other", "--cidr", "10.40.0.0/24", "--dns-server", "dns.example"],
     "nameserver"),
    (5, ["pool", "create", "other", "--from", "10.10.0.0/24", "--prefix-len", "16"],
     "prefix length"),
    (5, ["pool", "create", "other", "--cidr", "10.40.0.0/24", "--reserve", "10.99.0.1"],
     "outside"),
    (4, ["pool", "create", "other", "--from", "10.10.0.0/24", "--prefix-len", "25"],
     "no free /25"),
    (2, ["pool", "create", "other"], "--cidr"),
    (2, ["pool", "create", "other", "--cidr", "10.40.0.0/24", "--from", "10.0.0.0/8"], "not both"),
    (2, ["pool", "create", "other", "--from", "10.0.0.0/8"], "--prefix-len"),
    (2, ["pool", "create", "other", "--cidr", "10.40.0.0/24", "--vlan", "ten"], "--vlan"),
    (2, ["pool", "create", "other", "--cidr", "10.40.0.0/24", "--vlan", "5000"], "1-4094"),
    (2, ["pool", "create", "other", "--cidr", "10.40.0.0/24", "--vlan-range", "0-10"], "1-4094"),
    (2, ["pool", "create", "other", "--cidr", "10.40.0.0/24", "--vlan-range", "5"], "LO-HI"),
    (2, ["pool", "create", "other", "--cidr", "10.40.0.0/24", "--label", "novalue"], "KEY=VALUE"),
    (2, ["pool", "create", "other", "--cidr", "10.40.0.0/24", "--mode", "vxlan"], "--mode"),
    (2, ["pool", "create", "other", "--cidr", "10.40.0.0/24", "--route", "10.0.0.0/8,gateway=x"],
     "DST[,via=GW]"),
    (2, ["pool", "frobnicate"], "No such command"),
    (3, ["pool", "show", "nope"], "does not exist"),
    (3, ["pool", "delete", "nope"], "does not exist"),
    (4, ["pool", "delete", "web"], "allocated"),
    (3, ["ip", "reserve", "nope", "10.10.0.5"], "does not exist"),
    (5, ["ip", "reserve", "web", "10.99.0.1"], "outside"),
    (5, ["ip", "reserve", "web", "10.10.0.20-10.10.0.10"], "ends before it starts"),
    (5, ["ip", "reserve", "web", "banana"], "invalid address"),
    (4, ["ip", "reserve", "web", "10.10.0.1"], "already reserved"),
    (4, ["ip", "reserve", "web", "10.10.0.2"], "allocated to cid1/eth0"),
    (4, ["ip", "reserve", "web", "10.10.0.30-10.10.0.60"], "already reserved"),
    (5, ["ip", "unreserve", "web", "garbage"], "invalid address"),
    (4, ["ip", "assign", "web", "10.10.0.1", "--handle", "gw"], "gateway"),
    (4, ["ip", "assign", "web", "10.10.0.2", "--handle", "taken"], "allocated"),
    (4, ["ip", "assign", "web", "10.10.0.60", "--handle", "db-0"], "already assigned"),
    (5, ["ip", "assign", "web", "10.10.0.61", "--handle", "bad handle"], "invalid handle"),
    (2, ["ip", "assign", "web", "10.10.0.61"], "--handle"),
    (2, ["ip", "release"], "--owner"),
    (2, ["ip", "release", "--owner", "cid1", "--force"], "--force"),
    (5, ["ip", "release", "10.10.0.2"], "needs its owner"),
    (5, ["ip", "release", "--pool", "web", "10.11.0.2", "--force"], "not in pool"),
    (3, ["ip", "release", "192.0.2.1", "--force"], "in no pool"),
    (3, ["ip", "show", "192.0.2.1"], "in no pool"),
    (5, ["ip", "show", "not-an-ip"], "invalid address"),
    (5, ["ip", "history", "not-an-ip"], "invalid address"),
    (2, ["ip", "history", "10.10.0.2", "--limit", "0"], "--limit"),
    (3, ["ip", "list", "--pool", "nope"], "does not exist"),
    (2, ["ip", "list", "--state", "leaked"], "--state"),
    (2, ["gc", "--dry-run"], "host agent"),
    (2, ["--bogus", "pool", "list"], "No such option"),
]


def test_bad_input_fails_cleanly_and_changes_nothing(server: Server) -> None:
    ok(server, "pool", "create", "web", "--cidr", "10.10.0.0/24", "--reserve",
       "10.10.0.30-10.10.0.40")
    ok(server, "ip", "assign", "web", "10.10.0.50", "--handle", "db-0")
    with agent(server) as c:
        assert c.allocate("web", "cid1", host="h1")["ip"] == "10.10.0.2"
    before = snapshot(server)

    def check(case: tuple[int, list[str], str]) -> None:
        code, argv, part = case
        line = fails(server, code, *argv)
        assert part.lower() in line.lower(), f"{argv}: {line}"

    with ThreadPoolExecutor(8) as pool:  # none of them changes anything, so order is free
        list(pool.map(check, BAD))
    assert snapshot(server) == before


def test_wrong_or_missing_token_is_refused(server: Server, tmp_path: Path) -> None:
    ok(server, "pool", "create", "web", "--cidr", "10.10.0.0/24")
    before = snapshot(server)
    mutations = [
        ["pool", "create", "other", "--cidr", "10.40.0.0/24"],
        ["pool", "delete", "web", "--force"],
        ["ip", "reserve", "web", "10.10.0.9"],
        ["ip", "unreserve", "web", "10.10.0.1"],
        ["ip", "assign", "web", "10.10.0.9", "--handle", "x"],
        ["ip", "release", "10.10.0.9", "--force"],
    ]
    for argv in mutations:
        line = fails(server, 6, *argv, token="wrong-token")
        assert "token" in line
        fails(server, 6, *argv, env={"NETD_TOKEN": ""})
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    fails(server, 6, "--token-file", str(wrong), *mutations[0], env={"NETD_TOKEN": ""})
    assert snapshot(server) == before
    # reads need the token too (the server has one): who holds what is not for anyone
    for argv in (["pool", "list"], ["ip", "list"], ["ip", "show", "10.10.0.1"],
                 ["ip", "history", "10.10.0.1"], ["host", "list"]):
        assert "token" in fails(server, 6, *argv, token="wrong-token")
        fails(server, 6, *argv, env={"NETD_TOKEN": ""})
    # the right token from a file, and from the environment
    right = tmp_path / "right"
    right.write_text(server.token + "\n")
    ok(server, "--token-file", str(right), "ip", "reserve", "web", "10.10.0.9",
       env={"NETD_TOKEN": "wrong-token"})
    ok(server, "ip", "reserve", "web", "10.10.0.10", env={"NETD_TOKEN": server.token})
    fails(server, 2, "--token-file", str(tmp_path / "missing"), "pool", "list")
    fails(server, 2, "--token", "a", "--token-file", str(right), "pool", "list")


def test_server_url_from_environment(server: Server) -> None:
    res = run(None, "--json", "pool", "create", "web", "--cidr", "10.10.0.0/24",
              env={"NETD_SERVER": server.url, "NETD_TOKEN": server.token})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["name"] == "web"
    events = httpx.get(f"{server.url}/v1/history",
                       headers={"Authorization": f"Bearer {server.token}"}).json()["events"]
    # pool-create, then the gateway's automatic reservation
    assert [e["action"] for e in events[-2:]] == ["pool-create", "reserve"]
    assert {e["actor"] for e in events[-2:]} == {"netctl:alice"}


def test_server_down_is_unavailable(server: Server) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = fails(None, 7, "pool", "list", url=url)
    assert url in line and "cannot reach" in line
    server.stop()
    line = fails(server, 7, "ip", "reserve", "web", "10.10.0.9")
    assert server.url in line
    fails(server, 7, "--json", "host", "list")


def test_bad_server_url_is_invalid_input() -> None:
    line = fails(None, 5, "pool", "list", url="127.0.0.1:9650")
    assert "invalid server URL" in line


def test_help_documents_exit_codes() -> None:
    res = subprocess.run([bin_path("netctl"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for code, what in [(1, "other error"), (2, "usage"), (3, "not found"), (4, "conflict"),
                       (5, "invalid input"), (6, "unauthorized"), (7, "unavailable")]:
        assert re.search(rf"^\s+{code}\s+{what}", res.stdout, re.M), what
