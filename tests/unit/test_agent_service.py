"""The agent's endpoint pipeline through the CNI handler, with the real IPAM API in-process
and a driver in memory (the real ones: tests/integration/test_agent_core.py and the podman
and Docker tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netd.agent.config import AgentConfig
from netd.agent.service import Agent, EndpointRequest
from netd.agent.state import Attachment, StateStore
from netd.cni.handler import CniHandler
from netd.dataplane.driver import Endpoint
from netd.dataplane.veth import host_ifname_for
from netd.ipam.service import IPAM
from tests.unit.fakes import FakeDriver, FakeNamespaces, FlakyIpam, allocated, ipam_api

NETNS = {"/run/netns/c1", "/run/netns/c2", "/run/netns/c3"}


class Parts:
    def __init__(self, agent: Agent, ipam: IPAM, client: FlakyIpam, dp: FakeDriver,
                 netns: FakeNamespaces) -> None:
        self.agent, self.ipam, self.client, self.dp, self.netns = agent, ipam, client, dp, netns
        self.cni = CniHandler(agent)

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.cni.handle(req)

    def owners(self) -> list[str]:
        return sorted(allocated(self.ipam).values())


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    with ipam_api() as (ipam, client):
        netns = FakeNamespaces(NETNS)
        dp = FakeDriver()
        state = StateStore(str(tmp_path))
        agent = Agent(AgentConfig(host="h1", state_dir=str(tmp_path)), client, dp,  # type: ignore[arg-type]
                      state, netns_exists=netns.exists, check_netns=netns.check)
        yield Parts(agent, ipam, client, dp, netns)
        agent.close()
        state.close()


def request(command: str, cid: str = "c1", netns: str | None = "/run/netns/c1",
            plugin: str = "netd-cni", network: str = "net1", ifname: str = "eth0",
            **config: Any) -> dict[str, Any]:
    env = {"CNI_CONTAINERID": cid, "CNI_IFNAME": ifname, "CNI_PATH": "/opt/cni/bin"}
    if netns:
        env["CNI_NETNS"] = netns
    conf: dict[str, Any] = {"cniVersion": "1.0.0", "name": network, "type": plugin}
    if plugin == "netd-ipam":
        conf["ipam"] = {"type": "netd-ipam", "pool": "lab"}
    else:
        conf["pool"] = "lab"
    conf.update(config)
    return {"plugin": plugin, "command": command, "env": env, "config": conf}


def test_add_is_idempotent_and_del_cleans(parts: Parts) -> None:
    first = parts.handle(request("ADD"))["result"]
    assert first["ips"][0]["address"] == "198.18.0.50/24"
    assert first["interfaces"][0]["name"] == host_ifname_for("c1")
    assert first["interfaces"][1] == {"name": "eth0", "mac": "0a:58:c6:12:00:32",
                                      "sandbox": "/run/netns/c1"}
    assert first["routes"] == [{"dst": "0.0.0.0/0", "gw": "198.18.0.1"}]
    assert parts.handle(request("ADD"))["result"] == first
    assert parts.owners() == ["c1"] and len(parts.dp.links) == 1
    att = parts.agent.state.get("net1", "c1", "eth0")
    assert att is not None and att.mode == "l2" and att.mtu == 1500
    assert att.data == {"bridge": "br0"} and att.gateway == "198.18.0.1"
    assert parts.handle(request("DEL")) == {"result": {}}
    assert parts.handle(request("DEL", netns=None)) == {"result": {}}
    assert parts.owners() == [] and parts.dp.links == {} and parts.agent.state.all() == []


def test_failed_add_leaves_nothing(parts: Parts) -> None:
    parts.dp.fail_attach = True
    err = parts.handle(request("ADD"))["error"]
    assert err["code"] == 104 and "kernel said no" in err["msg"]
    assert parts.owners() == [] and parts.dp.links == {} and parts.agent.state.all() == []


def test_unknown_netns_and_bad_input_change_nothing(parts: Parts) -> None:
    assert parts.handle(request("ADD", netns="/run/netns/nope"))["error"]["code"] == 3
    assert parts.handle(request("ADD", pool="nope"))["error"]["code"] == 101
    bad = request("ADD")
    bad["env"]["CNI_IFNAME"] = "x" * 16
    assert parts.handle(bad)["error"]["code"] == 4
    assert parts.owners() == [] and parts.dp.links == {} and parts.agent.state.all() == []


def test_ipam_down_add_fails_fast_del_queues(parts: Parts) -> None:
    parts.handle(request("ADD"))
    parts.client.down = True
    assert parts.handle(request("ADD", cid="c2", netns="/run/netns/c2"))["error"]["code"] == 11
    assert parts.handle(request("DEL")) == {"result": {}}
    assert parts.dp.links == {} and len(parts.agent.state.pending()) >= 1
    assert parts.agent.flush_releases() >= 1
    parts.client.down = False
    assert parts.agent.flush_releases() == 0
    assert parts.owners() == [] and parts.agent.state.pending() == []


def test_duplicate_on_the_wire_is_reserved_and_skipped(parts: Parts) -> None:
    parts.dp.wire["198.18.0.50"] = "52:54:00:12:34:56"
    res = parts.handle(request("ADD"))["result"]
    assert res["ips"][0]["address"] == "198.18.0.51/24"
    state = parts.ipam.show("198.18.0.50")
    assert state["state"] == "reserved" and "52:54:00:12:34:56" in state["note"]
    # a requested address that is taken on the wire is refused, not swapped
    parts.dp.wire["198.18.0.60"] = "52:54:00:12:34:57"
    err = parts.handle(request("ADD", cid="c2", netns="/run/netns/c2",
                               runtimeConfig={"ips": ["198.18.0.60/24"]}))["error"]
    assert err["code"] == 103 and "52:54:00:12:34:57" in err["msg"]
    assert parts.owners() == ["c1"]
    assert parts.ipam.show("198.18.0.60")["state"] == "reserved"


def test_same_owner_on_a_second_network_is_refused_both_del_orders(parts: Parts) -> None:
    first = parts.handle(request("ADD", network="net1"))["result"]
    err = parts.handle(request("ADD", network="net2"))["error"]
    assert err["code"] == 106 and "net1" in err["msg"]
    # DEL of the refused network touches nothing of the first
    assert parts.handle(request("DEL", network="net2")) == {"result": {}}
    assert parts.owners() == ["c1"] and len(parts.dp.links) == 1
    assert parts.handle(request("ADD", network="net1"))["result"] == first
    # the other order: the first network goes, then the second's DEL is a no-op
    assert parts.handle(request("DEL", network="net1")) == {"result": {}}
    assert parts.handle(request("DEL", network="net2")) == {"result": {}}
    assert parts.owners() == [] and parts.dp.links == {}
    # another interface name on the second network is fine
    assert "result" in parts.handle(request("ADD", network="net1"))
    assert "result" in parts.handle(request("ADD", network="net2", ifname="net1"))
    assert len(parts.dp.links) == 2


def test_del_without_a_record_touches_only_its_owners_objects(parts: Parts) -> None:
    parts.handle(request("ADD"))
    # someone else's interface where c9's would be: not this DEL's
    foreign = host_ifname_for("c9")
    parts.dp.links[foreign] = (Endpoint("x", "eth0", None, foreign), parts.dp.mark(
        Endpoint("x", "eth0", None, foreign)))
    assert parts.handle(request("DEL", cid="c9")) == {"result": {}}
    assert foreign in parts.dp.links and parts.owners() == ["c1"]


def test_reconcile_undoes_interrupted_and_gone_and_repairs(parts: Parts) -> None:
    for c in ("c1", "c2", "c3"):
        parts.handle(request("ADD", cid=c, netns=f"/run/netns/{c}"))
    parts.netns.discard("/run/netns/c2")  # c2's container went away while the agent was down
    att = parts.agent.state.get("net1", "c3", "eth0")
    assert att is not None
    att.state = "adding"  # c3 crashed half-way through an ADD
    parts.agent.state.put(att)
    parts.dp.configured.pop(host_ifname_for("c1"))  # c1's plumbing damaged
    # an orphaned veth of ours with no record and no allocation
    ghost = Endpoint("ghost", "eth0", "/run/netns/c1", host_ifname_for("ghost"))
    parts.dp.links[ghost.host_ifname] = (ghost, parts.dp.mark(ghost))
    done = parts.agent.reconcile()
    assert any("c2" in d and "gone" in d for d in done), done
    assert any("interrupted" in d for d in done) and any("repaired" in d for d in done)
    assert any("orphaned" in d for d in done)
    assert parts.owners() == ["c1"]
    assert [a.container_id for a in parts.agent.state.all()] == ["c1"]
    assert list(parts.dp.links) == [host_ifname_for("c1")] and parts.agent.reconciled


def test_one_failing_record_does_not_stop_reconcile(parts: Parts) -> None:
    for c in ("c1", "c2"):
        parts.handle(request("ADD", cid=c, netns=f"/run/netns/{c}"))
    parts.dp.configured.clear()  # both damaged
    parts.dp.fail_repair.add(host_ifname_for("c1"))
    done = parts.agent.reconcile()
    assert any("repaired" in d and "c2" in d for d in done), done
    assert list(parts.agent.failed) == [("net1", "c1", "eth0")]
    assert "cannot repair" in parts.agent.failed[("net1", "c1", "eth0")]
    assert len(parts.agent.state.all()) == 2  # kept for the next pass
    st = parts.handle({"command": "AGENT_STATUS"})["result"]
    assert st["not_reconciled"][0]["container_id"] == "c1"
    parts.dp.fail_repair.clear()
    parts.agent.reconcile(sweep=False)
    assert parts.agent.failed == {} and parts.handle(request("CHECK", prevResult=parts.handle(
        request("ADD"))["result"]))["result"] == {}


def test_lost_state_is_adopted_not_swept(parts: Parts, tmp_path: Path) -> None:
    for c in ("c1", "c2"):
        parts.handle(request("ADD", cid=c, netns=f"/run/netns/{c}"))
    before = dict(parts.dp.links)
    # the state_dir is lost: a fresh agent with an empty database on the same kernel
    state = StateStore(str(tmp_path / "new"))
    fresh = Agent(parts.agent.cfg, parts.client, parts.dp, state,  # type: ignore[arg-type]
                  netns_exists=parts.netns.exists, check_netns=parts.netns.check)
    parts.netns.discard("/run/netns/c2")  # and c2 died meanwhile
    done = fresh.reconcile()
    assert any("adopted" in d and "c1" in d for d in done), done
    assert any("c2" in d and "gone" in d for d in done), done
    assert list(parts.dp.links) == [host_ifname_for("c1")] and len(before) == 2
    att = state.get("net1", "c1", "eth0")
    assert att is not None and att.state == "ready" and att.ip == "198.18.0.50"
    assert att.netns == "/run/netns/c1" and att.gateway == "198.18.0.1"
    assert sorted(allocated(parts.ipam).values()) == ["c1"]
    cni = CniHandler(fresh)
    assert cni.handle(request("DEL")) == {"result": {}}
    assert allocated(parts.ipam) == {} and parts.dp.links == {}
    fresh.close()
    state.close()


def test_sweep_needs_the_ipam(parts: Parts) -> None:
    ghost = Endpoint("ghost", "eth0", "/run/netns/c1", host_ifname_for("ghost"))
    parts.dp.links[ghost.host_ifname] = (ghost, parts.dp.mark(ghost))
    parts.client.down = True
    parts.agent.reconcile()
    assert ghost.host_ifname in parts.dp.links and not parts.agent.reconciled
    parts.client.down = False
    parts.agent.reconcile(sweep=not parts.agent.reconciled)
    assert ghost.host_ifname not in parts.dp.links and parts.agent.reconciled


def test_gc_removes_what_is_not_valid(parts: Parts) -> None:
    for c in ("c1", "c2"):
        parts.handle(request("ADD", cid=c, netns=f"/run/netns/{c}"))
    # a leaked allocation of this network and host with no local record
    parts.client.allocate("lab", "leaked", host="h1", labels={"netd.network": "net1"})
    parts.client.allocate("lab", "other-net", host="h1", labels={"netd.network": "net2"})
    time.sleep(0.01)
    gc = request("GC", cniVersion="1.1.0")
    gc["config"]["cni.dev/valid-attachments"] = [{"containerID": "c1", "ifname": "eth0"}]
    assert parts.handle(gc) == {"result": {}}
    assert parts.owners() == ["c1", "other-net"]
    assert [a.container_id for a in parts.agent.state.all()] == ["c1"]


def test_gc_never_releases_what_an_add_in_flight_holds(parts: Parts) -> None:
    """The ADD records and allocates, GC runs while its veth is being made: the ADD wins."""
    entered, release = threading.Event(), threading.Event()

    def slow_prepare(ep: Endpoint) -> None:
        entered.set()
        assert release.wait(5)

    parts.dp.on_prepare = slow_prepare
    answers: list[dict[str, Any]] = []
    adder = threading.Thread(target=lambda: answers.append(
        parts.handle(request("ADD", cid="c2", netns="/run/netns/c2"))))
    adder.start()
    assert entered.wait(5)
    time.sleep(0.05)  # the ADD's allocation is in the IPAM by now (it runs beside prepare)
    gc = request("GC", cniVersion="1.1.0")
    gc["config"]["cni.dev/valid-attachments"] = []
    gc_done: list[dict[str, Any]] = []
    gcer = threading.Thread(target=lambda: gc_done.append(parts.handle(gc)))
    gcer.start()
    time.sleep(0.1)
    release.set()
    adder.join(10)
    gcer.join(10)
    assert "result" in answers[0] and gc_done == [{"result": {}}]
    assert parts.owners() == ["c2"] and len(parts.dp.links) == 1


def test_status_reports_exhaustion_and_unreachable_ipam(parts: Parts) -> None:
    st = request("STATUS", cniVersion="1.1.0")
    assert parts.handle(st) == {"result": {}}
    parts.ipam.reserve("lab", "198.18.0.50-198.18.0.254")
    assert parts.handle(st)["error"]["code"] == 50
    parts.client.down = True
    assert parts.handle(st)["error"]["code"] == 50


def test_agent_status_lists_attachments_of_every_plugin(parts: Parts) -> None:
    parts.handle(request("ADD"))
    parts.agent.state.put(Attachment("n" * 64, "e" * 64, "eth0", "docker", "ready", None, "lab",
                                     host_ifname="ndv0", ip="198.18.0.60",
                                     extra={"container_name": "web1"}))
    st = parts.handle({"command": "AGENT_STATUS"})["result"]
    assert [(a["plugin"], a["name"]) for a in st["attachments"]] == [
        ("netd-cni", ""), ("docker", "web1")]
    assert st["mode"] == "l2" and st["docker_plugin"] is False and st["not_reconciled"] == []


def test_ipam_plugin_add_del_and_old_versions(parts: Parts) -> None:
    res = parts.handle(request("ADD", plugin="netd-ipam", cniVersion="0.3.1"))["result"]
    assert res["cniVersion"] == "0.3.1" and res["ips"][0]["version"] == "4"
    assert "interfaces" not in res and parts.dp.links == {}
    assert parts.handle(request("DEL", plugin="netd-ipam")) == {"result": {}}
    assert parts.owners() == []


def test_exhausted_pool_error_code(parts: Parts) -> None:
    parts.ipam.reserve("lab", "198.18.0.50-198.18.0.254")
    err = parts.handle(request("ADD"))["error"]
    assert err["code"] == 102
    assert parts.dp.links == {} and parts.agent.state.all() == []


def test_retried_add_is_not_freed_by_a_queued_release(parts: Parts) -> None:
    parts.client.down = True
    assert parts.handle(request("ADD"))["error"]["code"] == 11
    assert len(parts.agent.state.pending()) == 1  # the failed ADD's release, queued
    parts.client.down = False
    assert "result" in parts.handle(request("ADD"))
    assert parts.agent.state.pending() == []
    parts.agent.flush_releases()
    assert parts.owners() == ["c1"]
    # and a release queued while the owner is attached again is dropped, not sent
    parts.agent.state.queue_release("lab", "c1", "eth0", None, "test")
    parts.agent.flush_releases()
    assert parts.owners() == ["c1"] and parts.agent.state.pending() == []


def test_check_compares_kernel_ipam_and_prev_result(parts: Parts) -> None:
    res = parts.handle(request("ADD"))["result"]
    ok = request("CHECK", prevResult=res)
    assert parts.handle(ok) == {"result": {}}
    parts.dp.configured.clear()
    err = parts.handle(ok)["error"]
    assert err["code"] == 104 and "lacks address" in err["msg"]
    assert parts.handle(request("CHECK", cid="c3", netns="/run/netns/c3",
                                prevResult=res))["error"]["code"] == 104


# --- the driver makes the interface while the IPAM allocates -----------------------------


def test_add_records_first_prepares_beside_the_ipam_and_closes_what_it_prepared(
        parts: Parts) -> None:
    seen: list[str | None] = []

    def record_state(ep: Endpoint) -> None:
        att = parts.agent.state.get("net1", ep.container_id, ep.ifname)
        seen.append(att.state if att else None)  # recorded before anything exists

    parts.dp.on_prepare = record_state
    res = parts.handle(request("ADD"))["result"]
    assert res["ips"][0]["address"] == "198.18.0.50/24"
    assert seen == ["adding"] and [p.closed for p in parts.dp.prepared] == [1]
    # a duplicate on the wire: the next attempt makes a new interface without a prepared one
    parts.dp.wire["198.18.0.51"] = "52:54:00:12:34:56"
    res2 = parts.handle(request("ADD", cid="c2", netns="/run/netns/c2"))["result"]
    assert res2["ips"][0]["address"] == "198.18.0.52/24"
    assert all(p.closed >= 1 for p in parts.dp.prepared)


@pytest.mark.parametrize("failure", ["ipam down", "pool exhausted", "prepare", "attach"])
def test_add_that_fails_leaves_nothing(parts: Parts, failure: str) -> None:
    if failure == "ipam down":
        parts.client.down = True
    elif failure == "pool exhausted":
        parts.ipam.reserve("lab", "198.18.0.50-198.18.0.254")
    elif failure == "prepare":
        parts.dp.fail_prepare = True
    else:
        parts.dp.fail_attach = True
    err = parts.handle(request("ADD"))["error"]
    assert err["code"] == {"ipam down": 11, "pool exhausted": 102, "prepare": 104,
                           "attach": 104}[failure]
    assert parts.dp.links == {} and parts.agent.state.all() == []
    assert all(p.closed >= 1 for p in parts.dp.prepared)
    parts.client.down = False
    parts.agent.flush_releases()
    assert parts.owners() == []


def test_adopt_from_takes_over_a_provisional_owners_address(parts: Parts) -> None:
    """Docker's path: RequestAddress holds it for a provisional owner, the ADD takes it."""
    held = parts.client.allocate("lab", "pending-x", host="h1", mac="02:42:00:00:00:01")
    att = parts.agent.add(EndpointRequest(
        network="dnet", container_id="e1", ifname="eth0", pool="lab", plugin="docker",
        netns=None, ip=held["ip"], adopt_from="pending-x", labels={"netd.network": "dnet"}))
    assert att.ip == held["ip"] and att.mac == "02:42:00:00:00:01"
    assert att.peer_ifname is not None and att.peer_ifname.startswith("ndp")
    assert allocated(parts.ipam) == {held["ip"]: "e1"}
    again = parts.agent.add(EndpointRequest(
        network="dnet", container_id="e1", ifname="eth0", pool="lab", plugin="docker",
        netns=None, ip=held["ip"], adopt_from="pending-x"))
    assert again.ip == att.ip


def test_allowed_addresses_follow_the_ipam(parts: Parts) -> None:
    """netctl ip allow on a running container: the next sync pass hands it to the driver."""
    res = parts.handle(request("ADD"))["result"]
    ip = res["ips"][0]["address"].split("/")[0]
    assert parts.agent.sync_allowed() == []
    parts.ipam.reserve("lab", "198.18.0.200", note="VIP")
    parts.client.set_allowed(ip, "c1", ["198.18.0.200"])
    done = parts.agent.sync_allowed()
    assert done and "198.18.0.200" in done[0]
    host_ifname = host_ifname_for("c1")
    assert parts.dp.configured[host_ifname].allowed == ("198.18.0.200",)
    att = parts.agent.state.get("net1", "c1", "eth0")
    assert att is not None and att.allowed == ["198.18.0.200"]
    assert parts.agent.sync_allowed() == []  # nothing new
    parts.client.set_allowed(ip, "c1", [])
    parts.agent.sync_allowed()
    assert parts.dp.configured[host_ifname].allowed == ()


# --- what is not a container, and ids the IPAM refuses (issue 8) ----------------------------


def test_the_hosts_own_namespace_is_refused_and_nothing_changes(parts: Parts) -> None:
    before = parts.ipam.history()
    err = parts.handle(request("ADD", netns="/proc/self/ns/net"))["error"]
    assert err["code"] == 4 and "host's own" in err["msg"]
    assert parts.owners() == [] and parts.dp.links == {} and parts.agent.state.all() == []
    assert parts.ipam.history() == before  # nothing allocated, nothing reserved
    res = parts.handle(request("ADD"))["result"]
    check = parts.handle(request("CHECK", netns="/proc/self/ns/net", prevResult=res))["error"]
    assert check["code"] == 4


def test_container_ids_are_bounded_at_the_cni_boundary(parts: Parts) -> None:
    longest = "c" * 200
    assert "result" in parts.handle(request("ADD", cid=longest, netns="/run/netns/c1"))
    assert parts.owners() == [longest]
    assert parts.handle(request("DEL", cid=longest)) == {"result": {}}
    for cid in ("d" * 201, "e" * 256):
        err = parts.handle(request("ADD", cid=cid))["error"]
        assert err["code"] == 4 and "longer than 200" in err["details"]
    assert parts.owners() == [] and parts.dp.links == {} and parts.agent.state.all() == []


def test_a_permanent_ipam_refusal_never_wedges_del_or_reconcile(parts: Parts) -> None:
    """A record the IPAM will never release (its id is longer than the IPAM takes, left by
    an agent before the limit): DEL and reconcile finish it instead of failing for ever."""
    for n, state in enumerate(("deleting", "ready")):
        cid = f"{n}" * 256
        parts.agent.state.put(Attachment(network="net1", container_id=cid, ifname="eth0",
                                         plugin="netd-ipam", state=state, netns=None,
                                         pool="lab", ip=f"198.18.0.{60 + n}"))
    assert parts.agent.state.pending() == []
    parts.agent.reconcile()
    assert [a.state for a in parts.agent.state.all()] == ["ready"]  # the "deleting" one done
    parts.agent.delete("net1", "1" * 256, "eth0", pool="lab", plugin="netd-ipam")
    assert parts.agent.state.all() == [] and parts.agent.state.pending() == []
    # and the agent still serves
    assert "result" in parts.handle(request("ADD"))
