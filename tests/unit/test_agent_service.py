"""The agent pipeline with a fake IPAM and a fake dataplane (the real ones are
exercised by the podman tests in tests/integration)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from netd.agent.config import AgentConfig, L2Config
from netd.agent.service import Agent
from netd.agent.state import Attachment, DockerEndpoint, StateStore
from netd.dataplane.driver import Plumbing
from netd.dataplane.errors import AddressConflict, DataplaneError
from netd.errors import PoolExhausted, Unavailable
from netd.ipam.service import IPAM, AllocRequest, PoolSpec
from netd.ipam.store import SqliteStore


class FakeIpam:
    """The IPAM domain in memory behind the client's method names."""

    def __init__(self) -> None:
        self.ipam = IPAM(SqliteStore(":memory:"))
        self.ipam.create_pool(PoolSpec(name="lab", cidr="198.18.0.0/24",
                                       reserved=["198.18.0.1-198.18.0.49"]))
        self.down = False
        self.calls: list[str] = []

    def _check(self, what: str) -> None:
        self.calls.append(what)
        if self.down:
            raise Unavailable("cannot reach IPAM server at http://fake: down")

    def health(self) -> dict[str, Any]:
        self._check("health")
        return {"status": "ok"}

    def get_pool(self, name: str) -> dict[str, Any]:
        self._check("get_pool")
        pool, stats = self.ipam.get_pool(name)
        return {**pool.to_dict(), "free": stats.free}

    def allocate(self, pool: str, container_id: str, ifname: str = "eth0", host: str = "",
                 netns: str = "", labels: dict[str, str] | None = None, ip: str | None = None,
                 mac: str | None = None, handle: str | None = None) -> dict[str, Any]:
        self._check("allocate")
        a, p = self.ipam.allocate(AllocRequest(pool=pool, container_id=container_id,
                                               ifname=ifname, host=host, netns=netns,
                                               labels=labels or {}, ip=ip, mac=mac,
                                               handle=handle))
        ip_text = str(__import__("ipaddress").ip_address(a.ip))
        return {"pool": pool, "ip": ip_text, "address": f"{ip_text}/24", "mac": a.mac,
                "gateway": p.gateway, "routes": [], "dns": {}, "vlan": None,
                "container_id": container_id, "ifname": ifname, "labels": a.labels}

    def release(self, pool: str | None = None, container_id: str | None = None,
                ifname: str | None = None, ip: str | None = None,
                force: bool = False) -> dict[str, Any]:
        self._check("release")
        res = self.ipam.release(pool=pool, container_id=container_id, ifname=ifname, ip=ip,
                                force=force)
        return {"released": len(res.released), "message": res.message}

    def reserve(self, pool: str, range: str, note: str = "") -> dict[str, Any]:
        self._check("reserve")
        self.ipam.reserve(pool, range, note)
        return {}

    def show(self, ip: str) -> dict[str, Any]:
        self._check("show")
        return self.ipam.show(ip)

    def addresses(self, pool: str | None = None, host: str | None = None, limit: int = 1000,
                  after: str | None = None) -> dict[str, Any]:
        self._check("addresses")
        rows = self.ipam.addresses(pool=pool, host=host, limit=limit)
        return {"addresses": [
            {"pool": p.name, "ip": str(__import__("ipaddress").ip_address(a.ip)),
             "container_id": a.container_id, "ifname": a.ifname, "labels": a.labels}
            for a, p in rows]}

    def allocated(self) -> list[str]:
        return [a.container_id for a, _ in self.ipam.addresses()]


class FakeDataplane:
    def __init__(self) -> None:
        self.links: dict[str, Plumbing] = {}
        self.configured: set[str] = set()
        self.netns: set[str] = {"/run/netns/c1", "/run/netns/c2", "/run/netns/c3"}
        self.wire: dict[str, str] = {}  # ip -> MAC of a foreign machine
        self.fail_configure = False

    def start(self) -> list[str]:
        return []

    def create(self, p: Plumbing) -> None:
        self.links[p.host_ifname] = p

    def configure(self, p: Plumbing) -> None:
        if self.fail_configure:
            raise DataplaneError("RTNETLINK answers: kernel said no")
        self.configured.add(p.host_ifname)

    def attach(self, p: Plumbing, dad_timeout: float) -> None:
        holder = self.wire.get(p.address.split("/")[0])
        if holder:
            raise AddressConflict(p.address.split("/")[0], holder)
        self.create(p)
        try:
            self.configure(p)
        except DataplaneError:
            self.remove(p.host_ifname, None, None)
            raise

    def remove(self, host_ifname: str, netns: str | None, ifname: str | None) -> None:
        self.links.pop(host_ifname, None)
        self.configured.discard(host_ifname)

    def check(self, p: Plumbing) -> list[str]:
        return [] if p.host_ifname in self.configured else [f"{p.host_ifname} is missing"]

    def repair(self, p: Plumbing) -> bool:
        if p.host_ifname in self.configured:
            return False
        self.create(p)
        self.configure(p)
        return True

    def owned_links(self) -> list[str]:
        return list(self.links)

    def netns_exists(self, netns: str) -> bool:
        return netns in self.netns


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Agent, FakeIpam, FakeDataplane]:
    cfg = AgentConfig(host="h1", state_dir=str(tmp_path), l2=L2Config(dad_timeout=0.01))
    ipam, dp = FakeIpam(), FakeDataplane()
    return Agent(cfg, ipam, dp, StateStore(str(tmp_path))), ipam, dp


def request(command: str, cid: str = "c1", netns: str | None = "/run/netns/c1",
            plugin: str = "netd-cni", **config: Any) -> dict[str, Any]:
    env = {"CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
    if netns:
        env["CNI_NETNS"] = netns
    conf: dict[str, Any] = {"cniVersion": "1.0.0", "name": "net1", "type": plugin}
    if plugin == "netd-ipam":
        conf["ipam"] = {"type": "netd-ipam", "pool": "lab"}
    else:
        conf["pool"] = "lab"
    conf.update(config)
    return {"plugin": plugin, "command": command, "env": env, "config": conf}


def test_add_is_idempotent_and_del_cleans(parts: tuple[Agent, FakeIpam, FakeDataplane]) -> None:
    agent, ipam, dp = parts
    first = agent.handle(request("ADD"))["result"]
    assert first["ips"][0]["address"] == "198.18.0.50/24"
    assert agent.handle(request("ADD"))["result"] == first
    assert ipam.allocated() == ["c1"] and len(dp.links) == 1
    assert agent.handle(request("DEL")) == {"result": {}}
    assert agent.handle(request("DEL", netns=None)) == {"result": {}}
    assert ipam.allocated() == [] and dp.links == {} and agent.state.all() == []


def test_failed_add_leaves_nothing(parts: tuple[Agent, FakeIpam, FakeDataplane]) -> None:
    agent, ipam, dp = parts
    dp.fail_configure = True
    err = agent.handle(request("ADD"))["error"]
    assert err["code"] == 104 and "kernel said no" in err["msg"]
    assert ipam.allocated() == [] and dp.links == {} and agent.state.all() == []


def test_unknown_netns_and_bad_input_change_nothing(
        parts: tuple[Agent, FakeIpam, FakeDataplane]) -> None:
    agent, ipam, dp = parts
    assert agent.handle(request("ADD", netns="/run/netns/nope"))["error"]["code"] == 3
    assert agent.handle(request("ADD", pool="nope"))["error"]["code"] == 101
    bad = request("ADD")
    bad["env"]["CNI_IFNAME"] = "x" * 16
    assert agent.handle(bad)["error"]["code"] == 4
    assert ipam.allocated() == [] and dp.links == {} and agent.state.all() == []


def test_ipam_down_add_fails_fast_del_queues(
        parts: tuple[Agent, FakeIpam, FakeDataplane]) -> None:
    agent, ipam, dp = parts
    agent.handle(request("ADD"))
    ipam.down = True
    assert agent.handle(request("ADD", cid="c2", netns="/run/netns/c2"))["error"]["code"] == 11
    assert agent.handle(request("DEL")) == {"result": {}}
    assert dp.links == {} and len(agent.state.pending()) >= 1
    assert agent.flush_releases() >= 1
    ipam.down = False
    assert agent.flush_releases() == 0
    assert ipam.allocated() == [] and agent.state.pending() == []


def test_duplicate_on_the_wire_is_reserved_and_skipped(
        parts: tuple[Agent, FakeIpam, FakeDataplane]) -> None:
    agent, ipam, dp = parts
    dp.wire["198.18.0.50"] = "52:54:00:12:34:56"
    res = agent.handle(request("ADD"))["result"]
    assert res["ips"][0]["address"] == "198.18.0.51/24"
    state = ipam.ipam.show("198.18.0.50")
    assert state["state"] == "reserved" and "52:54:00:12:34:56" in state["note"]


def test_reconcile_undoes_interrupted_and_gone(
        parts: tuple[Agent, FakeIpam, FakeDataplane]) -> None:
    agent, ipam, dp = parts
    agent.handle(request("ADD", cid="c1", netns="/run/netns/c1"))
    agent.handle(request("ADD", cid="c2", netns="/run/netns/c2"))
    agent.handle(request("ADD", cid="c3", netns="/run/netns/c3"))
    # c2's container went away while the agent was down
    dp.netns.discard("/run/netns/c2")
    # c3 crashed half-way through an ADD: record 'adding', address allocated
    att = agent.state.get("net1", "c3", "eth0")
    assert att is not None
    att.state = "adding"
    agent.state.put(att)
    # an orphaned veth of ours with no record, and c1's plumbing lost
    dp.links["ndv000000000000"] = next(iter(dp.links.values()))
    dp.configured.discard(agent.state.get("net1", "c1", "eth0").host_ifname)  # type: ignore[union-attr]
    done = agent.reconcile()
    assert any("c2" in d for d in done) and any("interrupted" in d for d in done)
    assert any("orphaned" in d for d in done) and any("repaired" in d for d in done)
    assert ipam.allocated() == ["c1"]
    assert [a.container_id for a in agent.state.all()] == ["c1"]
    assert len(dp.links) == 1


def test_gc_removes_what_is_not_valid(parts: tuple[Agent, FakeIpam, FakeDataplane]) -> None:
    agent, ipam, _dp = parts
    for c in ("c1", "c2"):
        agent.handle(request("ADD", cid=c, netns=f"/run/netns/{c}"))
    # a leaked allocation of this network and host with no local record
    ipam.allocate("lab", "leaked", host="h1", labels={"netd.network": "net1"})
    gc = request("GC", cniVersion="1.1.0")
    gc["config"]["cni.dev/valid-attachments"] = [{"containerID": "c1", "ifname": "eth0"}]
    assert agent.handle(gc) == {"result": {}}
    assert ipam.allocated() == ["c1"]
    assert [a.container_id for a in agent.state.all()] == ["c1"]


def test_status_reports_exhaustion_and_unreachable_ipam(
        parts: tuple[Agent, FakeIpam, FakeDataplane]) -> None:
    agent, ipam, _dp = parts
    st = request("STATUS", cniVersion="1.1.0")
    assert agent.handle(st) == {"result": {}}
    ipam.ipam.reserve("lab", "198.18.0.50-198.18.0.254")
    assert agent.handle(st)["error"]["code"] == 50
    ipam.down = True
    assert agent.handle(st)["error"]["code"] == 50


def test_agent_status_lists_docker_endpoints(
        parts: tuple[Agent, FakeIpam, FakeDataplane]) -> None:
    agent, _ipam, _dp = parts
    assert agent.handle({"command": "AGENT_STATUS"})["result"]["docker_endpoints"] == []
    agent.handle(request("ADD"))
    agent.state.put_docker_endpoint(DockerEndpoint(
        "e" * 64, "n" * 64, "lab", "198.18.0.60", "198.18.0.60/24", "02:42:c6:12:00:3c",
        "joined", "nddeeeeeeeeeeee", "ndpeeeeeeeeeeee", sandbox="/var/run/docker/netns/x",
        container_name="web1"))
    st = agent.handle({"command": "AGENT_STATUS"})["result"]
    assert [a["plugin"] for a in st["attachments"]] == ["netd-cni"]
    assert st["docker_endpoints"] == [{
        "plugin": "docker", "network_id": "n" * 64, "endpoint_id": "e" * 64,
        "container_name": "web1", "pool": "lab", "state": "joined", "ip": "198.18.0.60",
        "mac": "02:42:c6:12:00:3c", "host_ifname": "nddeeeeeeeeeeee",
        "sandbox": "/var/run/docker/netns/x"}]
    assert st["docker_plugin"] is False


def test_ipam_plugin_add_del_and_old_versions(
        parts: tuple[Agent, FakeIpam, FakeDataplane]) -> None:
    agent, ipam, dp = parts
    res = agent.handle(request("ADD", plugin="netd-ipam", cniVersion="0.3.1"))["result"]
    assert res["cniVersion"] == "0.3.1" and res["ips"][0]["version"] == "4"
    assert "interfaces" not in res and dp.links == {}
    assert agent.handle(request("DEL", plugin="netd-ipam")) == {"result": {}}
    assert ipam.allocated() == []


def test_exhausted_pool_error_code(parts: tuple[Agent, FakeIpam, FakeDataplane]) -> None:
    agent, ipam, dp = parts
    ipam.ipam.reserve("lab", "198.18.0.50-198.18.0.254")
    err = agent.handle(request("ADD"))["error"]
    assert err["code"] == 102
    assert dp.links == {} and agent.state.all() == []
    with pytest.raises(PoolExhausted):
        ipam.allocate("lab", "x")


def test_state_survives_reopen(tmp_path: Path) -> None:
    one = StateStore(str(tmp_path))
    one.put(Attachment("n", "c", "eth0", "netd-cni", "ready", "/x", "lab", result={"a": 1}))
    one.close()
    two = StateStore(str(tmp_path))
    got = two.get("n", "c", "eth0")
    assert got is not None and got.result == {"a": 1}
    assert oct((tmp_path / "agent.db").stat().st_mode & 0o777) == "0o600"
    assert json.dumps(got.result)


def test_retried_add_is_not_freed_by_a_queued_release(
        parts: tuple[Agent, FakeIpam, FakeDataplane]) -> None:
    agent, ipam, _dp = parts
    ipam.down = True
    assert agent.handle(request("ADD"))["error"]["code"] == 11
    assert len(agent.state.pending()) == 1  # the failed ADD's release, queued
    ipam.down = False
    assert "result" in agent.handle(request("ADD"))
    assert agent.state.pending() == []
    agent.flush_releases()
    assert ipam.allocated() == ["c1"]
    # and a release queued while the owner is attached again is dropped, not sent
    agent.state.queue_release("lab", "c1", "eth0", None, "test")
    agent.flush_releases()
    assert ipam.allocated() == ["c1"] and agent.state.pending() == []


# --- a driver that makes the interface while the IPAM allocates ---------------------------


class FakePrepared:
    def __init__(self, dp: PreparingFakeDataplane, host_ifname: str) -> None:
        self.dp = dp
        self.host_ifname = host_ifname
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


class PreparingFakeDataplane(FakeDataplane):
    """prepare() makes the link without an address; attach() finishes the prepared one."""

    def __init__(self, state: StateStore) -> None:
        super().__init__()
        self.state = state
        self.prepared: list[FakePrepared] = []
        self.fail_prepare = False
        self.seen_state: list[str | None] = []

    def prepare(self, netns: str, ifname: str, host_ifname: str,
                container_id: str) -> FakePrepared:
        att = self.state.get("net1", container_id, ifname)
        self.seen_state.append(att.state if att else None)  # recorded before anything exists
        if self.fail_prepare:
            raise DataplaneError("no veth today")
        self.links[host_ifname] = Plumbing(netns, ifname, host_ifname, "", "")
        prepared = FakePrepared(self, host_ifname)
        self.prepared.append(prepared)
        return prepared

    def attach(self, p: Plumbing, dad_timeout: float,  # type: ignore[override]
               prepared: FakePrepared | None = None) -> None:
        if prepared is not None:
            assert prepared.host_ifname == p.host_ifname and not prepared.closed
            prepared.close()
        try:
            super().attach(p, dad_timeout)
        except BaseException:
            self.remove(p.host_ifname, None, None)
            raise


@pytest.fixture
def preparing(tmp_path: Path) -> tuple[Agent, FakeIpam, PreparingFakeDataplane]:
    cfg = AgentConfig(host="h1", state_dir=str(tmp_path), l2=L2Config(dad_timeout=0.01))
    state = StateStore(str(tmp_path))
    ipam, dp = FakeIpam(), PreparingFakeDataplane(state)
    return Agent(cfg, ipam, dp, state), ipam, dp


def test_prepared_add_records_first_and_closes_what_it_prepared(
        preparing: tuple[Agent, FakeIpam, PreparingFakeDataplane]) -> None:
    agent, ipam, dp = preparing
    res = agent.handle(request("ADD"))["result"]
    assert res["ips"][0]["address"] == "198.18.0.50/24"
    assert dp.seen_state == ["adding"]
    assert [p.closed >= 1 for p in dp.prepared] == [True]
    assert ipam.allocated() == ["c1"] and set(dp.configured) == set(dp.links)
    # a duplicate on the wire: the next attempt makes a new interface without a prepared one
    dp.wire["198.18.0.51"] = "52:54:00:12:34:56"
    res2 = agent.handle(request("ADD", cid="c2", netns="/run/netns/c2"))["result"]
    assert res2["ips"][0]["address"] == "198.18.0.52/24"
    assert all(p.closed >= 1 for p in dp.prepared)
    assert agent.handle(request("DEL")) == agent.handle(request("DEL", cid="c2")) == {
        "result": {}}
    assert ipam.allocated() == [] and dp.links == {} and agent.state.all() == []


@pytest.mark.parametrize("failure", ["ipam down", "pool exhausted", "prepare", "configure"])
def test_prepared_add_that_fails_leaves_nothing(
        preparing: tuple[Agent, FakeIpam, PreparingFakeDataplane], failure: str) -> None:
    agent, ipam, dp = preparing
    if failure == "ipam down":
        ipam.down = True
    elif failure == "pool exhausted":
        ipam.ipam.reserve("lab", "198.18.0.50-198.18.0.254")
    elif failure == "prepare":
        dp.fail_prepare = True
    else:
        dp.fail_configure = True
    err = agent.handle(request("ADD"))["error"]
    assert err["code"] == {"ipam down": 11, "pool exhausted": 102, "prepare": 104,
                           "configure": 104}[failure]
    assert dp.links == {} and agent.state.all() == []
    assert all(p.closed >= 1 for p in dp.prepared)
    ipam.down = False
    agent.flush_releases()
    assert ipam.allocated() == []
