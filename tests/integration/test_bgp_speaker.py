"""The speaker against a real FRR 8.4 bgpd: exabgp 5 driven by the agent's Speaker.

Two namespaces made per run: "host" (exabgp, AS 64512) and "tor" (FRR's bgpd
without zebra, AS 65001, sending the host a default route). Proves: the session
comes up; the default is received and decoded; announcements in batches reach
FRR and a withdrawal leaves it; a command exabgp refuses is an error (its
bare-word acks told apart from its JSON events); when the speaker is gone for
good, the ToR keeps the routes for the restart time (graceful restart), then
drops them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netd.bgp.driver import parse_bgp_settings
from netd.bgp.speaker import Speaker, SpeakerError
from tests.conftest import require
from tests.support.cnilab import add_netns, del_netns, wait_for
from tests.support.podman import run_prefix

pytestmark = [pytest.mark.real, pytest.mark.slow]

BGPD = "/usr/lib/frr/bgpd"
HOST, TOR = "10.9.0.1", "10.9.0.2"
RESTART = 4  # graceful restart time of the test: the ToR keeps the routes this long


@dataclass
class Fabric:
    host_ns: str
    tor_ns: str
    frr_dir: Path

    def vtysh(self, command: str) -> str:
        return subprocess.run(["vtysh", "--vty_socket", str(self.frr_dir), "-c", command],
                              capture_output=True, text=True, timeout=30, check=True).stdout

    def tor_routes(self) -> dict[str, object]:
        doc = json.loads(self.vtysh("show bgp ipv4 unicast json"))
        return {p: r for p, r in (doc.get("routes") or {}).items()
                if any(path.get("peerId") == HOST for path in r)}


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    require(shutil.which("vtysh") is not None and Path(BGPD).exists(),
            "FRR is missing (apt-get install frr)")
    prefix = run_prefix("bs")
    host_ns, tor_ns = f"{prefix}-h", f"{prefix}-t"
    frr = tmp_path / "frr"
    frr.mkdir()
    add_netns(host_ns)
    add_netns(tor_ns)
    try:
        for argv in (["-n", host_ns, "link", "add", "e0", "type", "veth", "peer", "name",
                      "e0", "netns", tor_ns],
                     ["-n", host_ns, "addr", "add", f"{HOST}/24", "dev", "e0"],
                     ["-n", tor_ns, "addr", "add", f"{TOR}/24", "dev", "e0"],
                     ["-n", host_ns, "link", "set", "e0", "up"],
                     ["-n", tor_ns, "link", "set", "e0", "up"]):
            subprocess.run(["ip", *argv], check=True, capture_output=True)
        (frr / "bgpd.conf").write_text("\n".join([
            "frr defaults datacenter", "hostname tor", "router bgp 65001",
            f" bgp router-id {TOR}", " no bgp ebgp-requires-policy", " bgp graceful-restart",
            f" neighbor {HOST} remote-as 64512", " address-family ipv4 unicast",
            f"  neighbor {HOST} default-originate",
            "  network 10.65.0.9/32",  # another host's address borrowed from our block
            "  network 10.70.0.0/24",  # somewhere else: the default covers it
            " exit-address-family", ""]))
        subprocess.run(["ip", "netns", "exec", tor_ns, BGPD, "-d", "-Z", "-S", "-f",
                        str(frr / "bgpd.conf"), "-i", str(frr / "bgpd.pid"),
                        "--vty_socket", str(frr), "-l", TOR], check=True, timeout=30)
        yield Fabric(host_ns, tor_ns, frr)
    finally:
        with contextlib.suppress(OSError, ValueError):
            subprocess.run(["kill", (frr / "bgpd.pid").read_text().strip()], check=False)
        del_netns(host_ns)
        del_netns(tor_ns)


def test_the_speaker_announces_to_frr_and_decodes_what_it_sends(fabric: Fabric,
                                                                tmp_path: Path) -> None:
    settings = parse_bgp_settings({"asn": 64512, "hold_time": 9, "restart_time": RESTART,
                                   "router_id": HOST,
                                   "peers": [{"address": TOR, "asn": 65001}]})
    changes: list[float] = []
    sp = Speaker(settings, tmp_path / "speaker", router_id=HOST, local_address=HOST,
                 netns=fabric.host_ns, on_change=lambda: changes.append(time.monotonic()))
    t0 = time.monotonic()
    sp.start()
    try:
        up = wait_for("the session", lambda: sp.established() == [TOR], 60, 0.1)
        wait_for("the ToR's default", lambda: "0.0.0.0/0" in sp.ribs[TOR].routes, 30, 0.1)
        assert sp.ribs[TOR].routes["0.0.0.0/0"] == TOR and changes
        blocks = {f"10.65.{i}.0/26" for i in range(200)}
        t1 = time.monotonic()
        sp.set_announced(blocks)
        wait_for("the blocks at the ToR", lambda: set(fabric.tor_routes()) >= blocks, 30,
                 0.1)
        took = time.monotonic() - t1
        sp.set_announced(blocks - {"10.65.7.0/26"})
        wait_for("the withdrawal at the ToR",
                 lambda: "10.65.7.0/26" not in fabric.tor_routes(), 30, 0.1)
        with pytest.raises(SpeakerError, match="refused"):
            sp.command("neighbor 10.9.0.2 announce bogus")
        sp.command(f"neighbor {TOR} announce route-refresh ipv4 unicast")  # still talking
        print(f"\nsession up {up:.1f} s after start ({time.monotonic() - t0:.1f} s total); "
              f"200 blocks at the ToR in {took:.2f} s")
    finally:
        sp.stop()
    # graceful restart: the ToR keeps the host's routes (stale) for the restart time, so
    # an agent restart loses none; an agent gone for good loses them after it
    stopped = time.monotonic()
    assert fabric.tor_routes(), "withdrawn at once: graceful restart did not hold them"
    gone = wait_for("the routes gone at the ToR", lambda: not fabric.tor_routes(),
                    RESTART + 10, 0.1)
    print(f"routes kept {time.monotonic() - stopped:.1f} s after the speaker stopped "
          f"(restart time {RESTART} s)")
    assert RESTART - 1 <= gone <= RESTART + 3


def kernel_routes(ns: str) -> dict[str, dict[str, object]]:
    out = subprocess.run(["ip", "-n", ns, "-j", "route", "show", "proto", "78"],
                         capture_output=True, text=True, check=True).stdout
    return {r["dst"]: r for r in json.loads(out or "[]")}


def test_the_bgp_driver_programs_what_the_tor_sends_and_announces_its_blocks(
        fabric: Fabric, tmp_path: Path) -> None:
    from netd.bgp.driver import BgpDriver
    from netd.dataplane.driver import Addressing, Endpoint
    from netd.dataplane.veth import host_ifname_for

    settings = parse_bgp_settings({
        "asn": 64512, "router_id": HOST, "local_address": HOST, "hold_time": 9,
        "restart_time": RESTART, "rundir": str(tmp_path / "bgp"),
        "peers": [{"address": TOR, "asn": 65001}]})
    drv = BgpDriver(settings, host_netns=fabric.host_ns)
    ctr = f"{fabric.host_ns}c"
    add_netns(ctr)
    try:
        drv.start()
        wait_for("the default in the kernel", lambda: kernel_routes(fabric.host_ns).get(
            "default", {}).get("gateway") == TOR, 60, 0.1)
        assert kernel_routes(fabric.host_ns)["default"]["metric"] == 20
        drv.sync_blocks(["10.65.0.0/26"])
        wait_for("the block at the ToR", lambda: "10.65.0.0/26" in fabric.tor_routes(), 30,
                 0.1)
        wait_for("the exception in the kernel",
                 lambda: "10.65.0.9" in kernel_routes(fabric.host_ns), 30, 0.1)
        routes = kernel_routes(fabric.host_ns)
        assert routes["10.65.0.9"]["gateway"] == TOR  # inside our block: installed
        assert "10.70.0.0/24" not in routes  # the default covers it
        # the ToR reflects our own block back: never installed over the blackhole
        assert "10.65.0.0/26" in routes and routes["10.65.0.0/26"].get("type") == "blackhole"
        # a container with a borrowed address (outside our blocks): its /32 announced
        cid = "bgpborrow" * 4
        ep = Endpoint(cid, "eth0", ctr, host_ifname_for(cid, "eth0"))
        drv.attach(ep, Addressing("10.66.0.5/24", "0a:58:0a:42:00:05", "10.66.0.1"))
        wait_for("the borrowed /32 at the ToR", lambda: "10.66.0.5/32" in fabric.tor_routes(),
                 30, 0.1)
        assert "10.65.0.0/26" in fabric.tor_routes()
        drv.detach(ep)
        wait_for("the borrowed /32 withdrawn",
                 lambda: "10.66.0.5/32" not in fabric.tor_routes(), 30, 0.1)
    finally:
        drv.stop()
        del_netns(ctr)
    # the agent's routes stay in the kernel across its restart (nothing removed them)
    assert kernel_routes(fabric.host_ns).get("default", {}).get("gateway") == TOR
