"""The Docker driver on the agent's pipeline, against the real IPAM API in-process, with a
driver in memory and a fake dockerd.

The same calls dockerd makes (payloads as recorded from dockerd 20.10), in
the order it makes them. tests/integration/test_docker.py runs the real thing.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netd.agent.config import AgentConfig, parse_config
from netd.agent.service import Agent
from netd.agent.state import StateStore
from netd.cni.docker_api import DockerUnreachable
from netd.cni.docker_driver import PENDING, DockerDriver, PluginError
from netd.cni.docker_server import PluginServer
from netd.dataplane.driver import Addressing, Attached, Endpoint
from netd.dataplane.veth import host_ifname_for, peer_ifname_for
from netd.errors import InvalidInput
from netd.ipam.service import IPAM
from tests.unit.fakes import FakeDriver, FlakyIpam, ipam_api

NID = "n" * 64
MAC = "02:42:c6:12:00:05"
GW_OPTS = {"RequestAddressType": "com.docker.network.gateway"}


class FakeDocker:
    def __init__(self) -> None:
        self.names: dict[str, str] = {}  # endpoint id -> container name
        self.nets: set[str] = {NID}
        self.asking: dict[str, str] = {}  # container name -> --ip
        self.down = False
        self.announced: list[tuple[str, str]] = []

    def network(self, network_id: str) -> dict[str, Any] | None:
        if self.down:
            raise DockerUnreachable("dockerd is down")
        if network_id not in self.nets:
            return None
        return {"Containers": {f"c-{eid}": {"EndpointID": eid, "Name": name}
                               for eid, name in self.names.items()}}

    def networks(self, driver: str) -> list[dict[str, Any]] | None:
        if self.down:
            return None
        return [{"Id": nid, "Driver": "netd",
                 "IPAM": {"Driver": "netd", "Options": {"pool": "lab"},
                          "Config": [{"Subnet": "198.18.0.0/24", "Gateway": "198.18.0.1"}]}}
                for nid in sorted(self.nets)]

    def endpoint_name(self, network_id: str, endpoint_id: str) -> str | None:
        return None if self.down else self.names.get(endpoint_id)

    def container_asks_for(self, name: str, ip: str) -> bool:
        return self.asking.get(name) == ip

    def announce(self, sandbox: str, pid: int, mac: str, ip: str,
                 stop: threading.Event) -> bool:
        self.announced.append((ip, mac))
        return True


class Parts:
    def __init__(self, ipam: IPAM, client: FlakyIpam, dp: FakeDriver, state: StateStore,
                 docker: FakeDocker, agent: Agent) -> None:
        self.ipam, self.client, self.dp, self.state = ipam, client, dp, state
        self.docker, self.agent = docker, agent


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    with ipam_api(routes=[{"dst": "10.200.0.0/16"},
                          {"dst": "10.201.0.0/16", "gw": "198.18.0.2"}]) as (ipam, client):
        from netd.ipam.service import PoolSpec

        ipam.create_pool(PoolSpec(name="tiny", cidr="198.18.9.0/30"))
        state = StateStore(str(tmp_path / "state"))
        dp = FakeDriver()
        agent = Agent(AgentConfig(host="h1"), client, dp, state)  # type: ignore[arg-type]
        yield Parts(ipam, client, dp, state, FakeDocker(), agent)
        agent.close()
        state.close()


@pytest.fixture
def ipam(parts: Parts) -> IPAM:
    return parts.ipam


@pytest.fixture
def state(parts: Parts) -> StateStore:
    return parts.state


@pytest.fixture
def docker(parts: Parts) -> FakeDocker:
    return parts.docker


@pytest.fixture
def client(parts: Parts) -> FlakyIpam:
    return parts.client


@pytest.fixture
def dp(parts: Parts) -> FakeDriver:
    return parts.dp


def make_driver(parts: Parts) -> DockerDriver:
    d = DockerDriver(parts.agent, docker=parts.docker, announce=parts.docker.announce)
    d.name_timeout = 0.5
    return d


@pytest.fixture
def driver(parts: Parts) -> DockerDriver:
    return make_driver(parts)


def call(driver: DockerDriver, method: str, req: dict[str, Any] | None = None) -> dict[str, Any]:
    return driver.call(method, req or {}, 4242)


def refused(driver: DockerDriver, method: str, req: dict[str, Any]) -> PluginError:
    with pytest.raises(PluginError) as info:
        driver.call(method, req, 4242)
    assert info.value.message.startswith("netd: ")
    return info.value


def allocations(ipam: IPAM) -> dict[str, Any]:
    return {str(__import__("ipaddress").ip_address(a.ip)): a for a, _ in ipam.addresses()}


def endpoints(state: StateStore) -> list[str]:
    return [a.container_id for a in state.all(plugin="docker")]


def create_network(driver: DockerDriver, pool: str = "lab") -> dict[str, Any]:
    answer = call(driver, "IpamDriver.RequestPool", {
        "AddressSpace": "netd", "Pool": "198.18.0.0/24" if pool == "lab" else "",
        "SubPool": "", "Options": {"pool": pool}, "V6": False})
    call(driver, "NetworkDriver.CreateNetwork", {
        "NetworkID": NID, "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "netd", "Pool": answer["Pool"],
                      "Gateway": answer["Data"]["com.docker.network.gateway"]}],
        "IPv6Data": []})
    return answer


def start_endpoint(driver: DockerDriver, eid: str, mac: str = MAC,
                   ip: str = "") -> dict[str, Any]:
    """RequestAddress, CreateEndpoint, Join: what ``docker run`` does."""
    got = call(driver, "IpamDriver.RequestAddress", {
        "PoolID": "lab", "Address": ip,
        "Options": {"com.docker.network.endpoint.macaddress": mac}})
    assert call(driver, "NetworkDriver.CreateEndpoint", {
        "NetworkID": NID, "EndpointID": eid,
        "Interface": {"Address": got["Address"], "AddressIPv6": "", "MacAddress": mac},
        "Options": {}}) == {}
    return call(driver, "NetworkDriver.Join", {"NetworkID": NID, "EndpointID": eid,
                                              "SandboxKey": f"/run/docker/netns/{eid[:12]}",
                                              "Options": {}}) | {"Address": got["Address"]}


def stop_endpoint(driver: DockerDriver, eid: str, address: str) -> None:
    """Leave, DeleteEndpoint, ReleaseAddress: what ``docker rm`` does."""
    for method in ("NetworkDriver.Leave", "NetworkDriver.DeleteEndpoint"):
        assert call(driver, method, {"NetworkID": NID, "EndpointID": eid}) == {}
    assert call(driver, "IpamDriver.ReleaseAddress",
                {"PoolID": "lab", "Address": address.split("/")[0]}) == {}


# --- handshake and pools ----------------------------------------------------------------


def test_handshake_answers(driver: DockerDriver) -> None:
    assert call(driver, "Plugin.Activate") == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert call(driver, "NetworkDriver.GetCapabilities") == {"Scope": "local",
                                                             "ConnectivityScope": "local"}
    assert call(driver, "IpamDriver.GetCapabilities") == {"RequiresMACAddress": True,
                                                          "RequiresRequestReplay": False}
    assert call(driver, "IpamDriver.GetDefaultAddressSpaces") == {
        "LocalDefaultAddressSpace": "netd", "GlobalDefaultAddressSpace": "netd"}
    for method in ("NetworkDriver.DiscoverNew", "NetworkDriver.DiscoverDelete",
                   "NetworkDriver.ProgramExternalConnectivity",
                   "NetworkDriver.RevokeExternalConnectivity", "IpamDriver.ReleasePool"):
        assert call(driver, method, {"NetworkID": NID, "EndpointID": "e"}) == {}
    assert refused(driver, "NetworkDriver.AllocateNetwork", {}).status == 404
    assert refused(driver, "NetworkDriver.Join", {"Bogus": 1}).status == 400


def test_request_pool_by_name_or_subnet(driver: DockerDriver, ipam: IPAM) -> None:
    ask = {"AddressSpace": "netd", "SubPool": "", "V6": False}
    by_name = call(driver, "IpamDriver.RequestPool",
                   {**ask, "Pool": "198.18.0.0/24", "Options": {"pool": "lab"}})
    assert by_name == {"PoolID": "lab", "Pool": "198.18.0.0/24",
                       "Data": {"com.docker.network.gateway": "198.18.0.1/24"}}
    # identical calls, identical answers; the subnet alone finds the pool too
    for _ in range(3):
        assert call(driver, "IpamDriver.RequestPool",
                    {**ask, "Pool": "198.18.0.0/24", "Options": {"pool": "lab"}}) == by_name
        assert call(driver, "IpamDriver.RequestPool",
                    {**ask, "Pool": "198.18.0.0/24", "Options": {}}) == by_name
    before = ipam.list_pools()
    for req, text in [
        ({"Pool": "198.18.0.0/16", "Options": {}},
         "subnet 198.18.0.0/16 overlaps pool 'lab' (198.18.0.0/24): use --subnet "
         "198.18.0.0/24 or --ipam-opt pool=lab"),
        ({"Pool": "10.9.0.0/24", "Options": {}}, "no pool has subnet 10.9.0.0/24"),
        ({"Pool": "", "Options": {"pool": "nope"}}, "pool 'nope' does not exist"),
        ({"Pool": "10.9.0.0/24", "Options": {"pool": "lab"}},
         "--subnet 10.9.0.0/24 is not the subnet of pool 'lab'"),
        ({"Pool": "", "Options": {}}, "choose the address pool"),
        ({"Pool": "", "Options": {"pool": "lab", "colour": "red"}}, "unknown --ipam-opt colour"),
        ({"Pool": "", "Options": {"pool": "lab"}, "V6": True}, "IPv6"),
        ({"Pool": "198.18.0.0/24", "SubPool": "198.18.0.128/25", "Options": {}},
         "--ip-range is not supported"),
    ]:
        err = refused(driver, "IpamDriver.RequestPool", {**ask, **req})
        assert text in err.message, err.message
        assert 400 <= err.status < 500
    assert ipam.list_pools() == before


def test_pool_on_a_routed_subnet_breaks_dockerds_loop(driver: DockerDriver) -> None:
    ask = {"AddressSpace": "netd", "Pool": "", "SubPool": "", "Options": {"pool": "lab"},
           "V6": False}
    assert call(driver, "IpamDriver.RequestPool", ask)["PoolID"] == "lab"
    # dockerd found the pool on a host route and asks again at once: the loop
    err = refused(driver, "IpamDriver.RequestPool", ask)
    assert "add --subnet 198.18.0.0/24" in err.message
    # a network that was created is no loop: asking again later is fine
    assert call(driver, "IpamDriver.RequestPool", ask)["PoolID"] == "lab"
    call(driver, "NetworkDriver.CreateNetwork", {
        "NetworkID": NID, "IPv4Data": [{"AddressSpace": "netd", "Pool": "198.18.0.0/24",
                                        "Gateway": "198.18.0.1/24"}]})
    assert call(driver, "IpamDriver.RequestPool", ask)["PoolID"] == "lab"


def test_create_network_needs_the_netd_ipam(driver: DockerDriver, state: StateStore) -> None:
    err = refused(driver, "NetworkDriver.CreateNetwork", {
        "NetworkID": NID, "IPv4Data": [{"AddressSpace": "LocalDefault",
                                        "Pool": "172.18.0.0/16", "Gateway": "172.18.0.1/16"}]})
    assert "--ipam-driver netd" in err.message
    create_network(driver)
    create_network(driver)  # idempotent
    assert [n.pool for n in state.docker_networks()] == ["lab"]
    assert call(driver, "NetworkDriver.DeleteNetwork", {"NetworkID": NID}) == {}
    assert state.docker_networks() == []


# --- addresses and endpoints --------------------------------------------------------------


def test_gateway_request_allocates_nothing(driver: DockerDriver, ipam: IPAM) -> None:
    req = {"PoolID": "lab", "Address": "", "Options": GW_OPTS}
    assert call(driver, "IpamDriver.RequestAddress", req) == {"Address": "198.18.0.1/24",
                                                              "Data": {}}
    assert call(driver, "IpamDriver.RequestAddress",
                {**req, "Address": "198.18.0.1"})["Address"] == "198.18.0.1/24"
    assert "gateway 198.18.0.1" in refused(driver, "IpamDriver.RequestAddress",
                                           {**req, "Address": "198.18.0.9"}).message
    assert "--aux-address" in refused(driver, "IpamDriver.RequestAddress",
                                      {"PoolID": "lab", "Address": "198.18.0.60"}).message
    assert allocations(ipam) == {}
    assert call(driver, "IpamDriver.ReleaseAddress",
                {"PoolID": "lab", "Address": "198.18.0.1"}) == {}


class RoutedDriver(FakeDriver):
    """The BGP mode's answer in memory: the address as a /32 behind 169.254.1.1."""

    mode = "bgp"
    routed = True

    def expected(self, ep: Endpoint, addressing: Addressing) -> Attached:
        return Attached(ep.host_ifname, ep.peer_ifname or ep.ifname, addressing.mac,
                        f"{addressing.ip}/32", "169.254.1.1", (), 1500, None, {})


def test_a_routed_mode_gets_a_host_route_behind_an_on_link_gateway(parts: Parts) -> None:
    agent = Agent(AgentConfig(host="h1"), parts.client, RoutedDriver(),  # type: ignore[arg-type]
                  parts.state)
    try:
        driver = DockerDriver(agent, docker=parts.docker, announce=parts.docker.announce)
        create_network(driver)
        eid = "e9" * 32
        parts.docker.names[eid] = "routed"
        joined = start_endpoint(driver, eid)
        # the /32 Docker configures, then the gateway on the link before the default route
        assert joined["Address"] == "198.18.0.50/32"
        assert joined["Gateway"] == "169.254.1.1"
        assert joined["StaticRoutes"] == [{"Destination": "169.254.1.1/32", "RouteType": 1}]
        assert driver.wait_idle()
        assert parts.docker.announced == []  # no segment to announce on
        assert allocations(parts.ipam)["198.18.0.50"].container_id == eid
        stop_endpoint(driver, eid, joined["Address"])
        assert allocations(parts.ipam) == {}
    finally:
        agent.close()


def test_docker_run_and_rm(driver: DockerDriver, ipam: IPAM, state: StateStore,
                           docker: FakeDocker, dp: FakeDriver) -> None:
    create_network(driver)
    eid = "e1" * 32
    docker.names[eid] = "web"
    joined = start_endpoint(driver, eid)
    assert joined["InterfaceName"] == {"SrcName": peer_ifname_for(eid), "DstPrefix": "eth"}
    assert joined["Gateway"] == "198.18.0.1"
    assert joined["StaticRoutes"] == [
        {"Destination": "10.200.0.0/16", "RouteType": 0, "NextHop": "198.18.0.1"},
        {"Destination": "10.201.0.0/16", "RouteType": 0, "NextHop": "198.18.0.2"}]
    assert joined["Address"] == "198.18.0.50/24"
    assert driver.wait_idle()
    a = allocations(ipam)["198.18.0.50"]
    assert (a.container_id, a.ifname, a.mac, a.host) == (eid, "eth0", MAC, "h1")
    assert a.labels == {"netd.plugin": "docker", "netd.network": NID,
                        "docker.network": NID[:12], "container_name": "web"}
    assert docker.announced == [("198.18.0.50", MAC)]
    att = state.get(NID, eid, "eth0")
    assert att is not None and att.extra["container_name"] == "web" and att.netns is None
    assert att.peer_ifname == peer_ifname_for(eid) and att.host_ifname == host_ifname_for(eid)
    assert list(dp.links) == [host_ifname_for(eid)]  # made by the mode's driver, handed over
    info = call(driver, "NetworkDriver.EndpointOperInfo", {"NetworkID": NID, "EndpointID": eid})
    assert info["Value"]["netd.pool"] == "lab" and info["Value"]["netd.mode"] == "l2"

    stop_endpoint(driver, eid, joined["Address"])
    assert allocations(ipam) == {}
    assert dp.links == {}
    assert endpoints(state) == [] and state.docker_addresses() == []
    # Docker repeating itself is harmless
    stop_endpoint(driver, eid, joined["Address"])


def test_docker_endpoints_are_probed_like_cni_ones(driver: DockerDriver, ipam: IPAM,
                                                   state: StateStore, dp: FakeDriver) -> None:
    create_network(driver)
    dp.wire["198.18.0.50"] = "52:54:00:aa:bb:cc"  # the host's own address, say
    got = call(driver, "IpamDriver.RequestAddress", {
        "PoolID": "lab", "Address": "", "Options": {"com.docker.network.endpoint.macaddress":
                                                    MAC}})
    assert got["Address"] == "198.18.0.50/24"
    err = refused(driver, "NetworkDriver.CreateEndpoint", {
        "NetworkID": NID, "EndpointID": "e9" * 32,
        "Interface": {"Address": got["Address"], "AddressIPv6": "", "MacAddress": MAC}})
    assert "52:54:00:aa:bb:cc" in err.message and err.status == 409
    assert call(driver, "IpamDriver.ReleaseAddress",
                {"PoolID": "lab", "Address": "198.18.0.50"}) == {}
    assert ipam.show("198.18.0.50")["state"] == "reserved"
    assert allocations(ipam) == {} and dp.links == {} and endpoints(state) == []
    assert state.docker_addresses() == []
    # the next run gets a free address
    joined = start_endpoint(driver, "e8" * 32, mac="02:42:00:00:00:08")
    assert joined["Address"] == "198.18.0.51/24"


def test_docker_and_cni_share_the_owner_locks(driver: DockerDriver, parts: Parts) -> None:
    create_network(driver)
    held = threading.Event()
    proceed = threading.Event()
    done: list[str] = []

    def hold() -> None:
        with parts.agent.locks.hold(("e7" * 32, "eth0")):
            held.set()
            proceed.wait(5)
            done.append("lock")

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(5)
    worker = threading.Thread(target=lambda: (start_endpoint(driver, "e7" * 32),
                                              done.append("endpoint")))
    worker.start()
    time.sleep(0.2)
    assert done == []  # CreateEndpoint waits for the owner's lock
    proceed.set()
    t.join(5)
    worker.join(5)
    assert done == ["lock", "endpoint"]


def test_request_address_is_idempotent_and_released_when_unused(
        driver: DockerDriver, ipam: IPAM, state: StateStore) -> None:
    create_network(driver)
    req = {"PoolID": "lab", "Address": "",
           "Options": {"com.docker.network.endpoint.macaddress": MAC}}
    first = call(driver, "IpamDriver.RequestAddress", req)
    assert call(driver, "IpamDriver.RequestAddress", req) == first
    a = allocations(ipam)["198.18.0.50"]
    assert a.container_id == PENDING + MAC.replace(":", "") and a.mac == MAC
    # CreateEndpoint failed: Docker gives the address back
    assert call(driver, "IpamDriver.ReleaseAddress",
                {"PoolID": "lab", "Address": "198.18.0.50"}) == {}
    assert allocations(ipam) == {} and state.docker_addresses() == []


def test_release_address_never_frees_an_endpoints_address(
        driver: DockerDriver, ipam: IPAM) -> None:
    create_network(driver)
    joined = start_endpoint(driver, "e2" * 32)
    ip = joined["Address"].split("/")[0]
    # a late ReleaseAddress of someone who held this address before
    assert call(driver, "IpamDriver.ReleaseAddress", {"PoolID": "lab", "Address": ip}) == {}
    assert allocations(ipam)[ip].container_id == "e2" * 32


def test_interface_is_filled_only_where_docker_left_it_empty(
        driver: DockerDriver, ipam: IPAM) -> None:
    create_network(driver)
    got = call(driver, "NetworkDriver.CreateEndpoint", {
        "NetworkID": NID, "EndpointID": "e3" * 32,
        "Interface": {"Address": "", "AddressIPv6": "", "MacAddress": ""}})
    a = allocations(ipam)["198.18.0.50"]
    assert got == {"Interface": {"Address": "198.18.0.50/24", "MacAddress": a.mac}}
    assert a.container_id == "e3" * 32
    mac = "02:42:c6:12:00:99"
    got = call(driver, "NetworkDriver.CreateEndpoint", {
        "NetworkID": NID, "EndpointID": "e4" * 32,
        "Interface": {"Address": "", "MacAddress": mac}})
    assert got == {"Interface": {"Address": "198.18.0.51/24"}}
    assert allocations(ipam)["198.18.0.51"].mac == mac


def test_fixed_address_for_a_handle(driver: DockerDriver, ipam: IPAM,
                                    docker: FakeDocker) -> None:
    create_network(driver)
    ipam.assign("lab", "198.18.0.88", "db")
    req = {"PoolID": "lab", "Address": "198.18.0.88",
           "Options": {"com.docker.network.endpoint.macaddress": MAC}}
    err = refused(driver, "IpamDriver.RequestAddress", req)
    assert "198.18.0.88 is assigned to handle 'db'" in err.message and err.status == 400
    docker.asking["db"] = "198.18.0.88"
    assert call(driver, "IpamDriver.RequestAddress", req)["Address"] == "198.18.0.88/24"
    a = allocations(ipam)["198.18.0.88"]
    assert a.handle == "db" and a.fixed and a.labels["container_name"] == "db"


def test_exhausted_pool_is_a_clear_error_and_changes_nothing(
        driver: DockerDriver, ipam: IPAM, state: StateStore) -> None:
    req = {"PoolID": "tiny", "Address": "",
           "Options": {"com.docker.network.endpoint.macaddress": MAC}}
    assert call(driver, "IpamDriver.RequestAddress", req)["Address"] == "198.18.9.2/30"
    before = (allocations(ipam), state.docker_addresses())
    err = refused(driver, "IpamDriver.RequestAddress", {
        **req, "Options": {"com.docker.network.endpoint.macaddress": "02:42:00:00:00:02"}})
    assert "pool 'tiny' (198.18.9.0/30) has no free address" in err.message
    assert (allocations(ipam), state.docker_addresses()) == before


def test_ipam_down_delete_is_queued(driver: DockerDriver, client: FlakyIpam, ipam: IPAM,
                                    state: StateStore) -> None:
    create_network(driver)
    joined = start_endpoint(driver, "e5" * 32)
    client.down = True
    assert "unreachable" in refused(driver, "IpamDriver.RequestAddress", {
        "PoolID": "lab", "Options": {"com.docker.network.endpoint.macaddress": MAC}}).message
    stop_endpoint(driver, "e5" * 32, joined["Address"])
    assert endpoints(state) == []
    assert [(p.container_id, p.ifname) for p in state.pending()] == [("e5" * 32, "eth0")]
    assert "198.18.0.50" in allocations(ipam)  # until the agent's flusher sends it


# --- restart --------------------------------------------------------------------------------


def test_reconcile_repairs_what_a_crash_left(parts: Parts, driver: DockerDriver, ipam: IPAM,
                                             state: StateStore, docker: FakeDocker,
                                             dp: FakeDriver, client: FlakyIpam) -> None:
    create_network(driver)
    live, gone = "a1" * 32, "b2" * 32
    docker.names[live] = "live"
    start_endpoint(driver, live)
    start_endpoint(driver, gone, mac="02:42:00:00:00:0b")
    call(driver, "IpamDriver.RequestAddress", {  # then the agent died
        "PoolID": "lab", "Options": {"com.docker.network.endpoint.macaddress":
                                     "02:42:00:00:00:0c"}})
    client.allocate("lab", "docker-pending-leak", host="h1", labels={"netd.plugin": "docker"})
    client.allocate("lab", "cni-owned", host="h1", labels={"netd.network": "x"})
    assert driver.wait_idle()

    parts.agent.reconcile()
    fresh = make_driver(parts)
    done = fresh.reconcile()
    assert any("gone from dockerd" in line for line in done), done
    owners = {a.container_id for a in allocations(ipam).values()}
    assert owners == {live, "cni-owned"}
    assert endpoints(state) == [live]
    assert list(dp.links) == [host_ifname_for(live)]
    # dockerd unreachable: its endpoints are kept as they are
    docker.down = True
    assert fresh.reconcile() == []
    assert endpoints(state) == [live]
    # the network is gone from dockerd: everything of it goes
    docker.down = False
    docker.nets.clear()
    fresh.reconcile()
    assert endpoints(state) == [] and state.docker_networks() == []
    assert {a.container_id for a in allocations(ipam).values()} == {"cni-owned"}


def test_lost_state_dir_docker_endpoints_are_adopted(parts: Parts, driver: DockerDriver,
                                                     ipam: IPAM, docker: FakeDocker,
                                                     dp: FakeDriver, client: FlakyIpam,
                                                     tmp_path: Path) -> None:
    create_network(driver)
    eid = "c3" * 32
    docker.names[eid] = "web"
    joined = start_endpoint(driver, eid)
    assert driver.wait_idle()
    state = StateStore(str(tmp_path / "lost"))  # the state_dir is gone
    agent = Agent(AgentConfig(host="h1"), client, dp, state)  # type: ignore[arg-type]
    done = agent.reconcile()
    assert any("adopted" in d for d in done), done
    fresh = DockerDriver(agent, docker=docker, announce=docker.announce)
    done = fresh.reconcile()
    assert any("learnt network" in d for d in done), done
    att = state.get(NID, eid, "eth0")
    assert att is not None and att.plugin == "docker" and att.extra["container_name"] == "web"
    assert allocations(ipam)[joined["Address"].split("/")[0]].container_id == eid
    assert list(dp.links) == [host_ifname_for(eid)]
    # and docker rm releases it
    stop_endpoint(fresh, eid, joined["Address"])
    assert allocations(ipam) == {} and dp.links == {}
    agent.close()
    state.close()


# --- the socket ------------------------------------------------------------------------------


def post(path: str, call_name: str, body: bytes = b"",
         method: str = "POST") -> tuple[int, dict[str, Any]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(f"{method} /{call_name} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
                  f"\r\nConnection: close\r\n\r\n".encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload) if payload else {}


class SlowDriver:
    def call(self, method: str, request: dict[str, Any], peer_pid: int = 0) -> dict[str, Any]:
        if method == "Slow.Call":
            time.sleep(0.5)
            return {"pid": peer_pid}
        if method == "Plugin.Activate":
            return {"Implements": ["NetworkDriver", "IpamDriver"]}
        raise PluginError(f"unknown call {method!r}", 404)


def test_plugin_socket_protocol(tmp_path: Path) -> None:
    path = str(tmp_path / "plugins" / "netd.sock")
    server = PluginServer(path, SlowDriver())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert post(path, "Plugin.Activate") == (
            200, {"Implements": ["NetworkDriver", "IpamDriver"]})
        status, body = post(path, "NetworkDriver.Nonsense", b"{}")
        assert status == 404 and body["Err"].startswith("netd: unknown call")
        status, body = post(path, "Plugin.Activate", b"{not json")
        assert status == 400 and "cannot decode" in body["Err"]
        status, body = post(path, "Plugin.Activate", b"[1, 2]")
        assert status == 400 and "Err" in body
        status, body = post(path, "Plugin.Activate", method="GET")
        assert status == 405 and "Err" in body
        # calls are served concurrently (ten parallel docker runs)
        results: list[tuple[int, dict[str, Any]]] = []
        start = time.monotonic()
        threads = [threading.Thread(target=lambda: results.append(post(path, "Slow.Call",
                                                                        b"{}")))
                   for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert time.monotonic() - start < 3
        assert results == [(200, {"pid": os.getpid()})] * 10
        with pytest.raises(RuntimeError):
            PluginServer(path, SlowDriver())  # in use: refused, not stolen
    finally:
        server.shutdown()
        server.server_close()
    assert not os.path.exists(path)


def test_plugin_socket_bounds_silent_connections(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Silent connections: at most max_connections are served (the rest get 503 at once),
    each is closed after the idle timeout, then dockerd's next call is served."""
    from netd.cni import docker_server
    monkeypatch.setattr(docker_server._Handler, "timeout", 0.5)
    path = str(tmp_path / "netd.sock")
    server = PluginServer(path, SlowDriver(), max_connections=8)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent: list[socket.socket] = []
    try:
        for _ in range(50):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(path)
            silent.append(s)
        time.sleep(0.2)
        assert sum("process_request_thread" in t.name for t in threading.enumerate()) <= 8
        for s in silent[8:]:
            assert s.recv(4096).startswith(b"HTTP/1.1 503 ")
        started = time.monotonic()
        for s in silent[:8]:
            assert s.recv(4096) == b""  # closed by the plugin after the idle timeout
        assert time.monotonic() - started < 5
        for s in silent:
            s.close()
        deadline = time.monotonic() + 5
        while (any("process_request_thread" in t.name for t in threading.enumerate())
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert post(path, "Plugin.Activate")[0] == 200
    finally:
        for s in silent:
            s.close()
        server.shutdown()
        server.server_close()


def test_config_keys() -> None:
    cfg = parse_config({"host": "h1"})
    assert (cfg.docker_plugin, cfg.docker_socket, cfg.docker_host) == (
        False, "/run/docker/plugins/netd.sock", "unix:///var/run/docker.sock")
    cfg = parse_config({"host": "h1", "docker_plugin": True, "docker_socket": "/run/x/n.sock",
                        "docker_host": "unix:///run/x/docker.sock"})
    assert (cfg.docker_plugin, cfg.docker_socket, cfg.docker_host) == (
        True, "/run/x/n.sock", "unix:///run/x/docker.sock")
    for bad in ({"docker_socket": "rel.sock"}, {"docker_host": "tcp://1.2.3.4:2375"},
                {"docker_plugin": "yes"}):
        with pytest.raises(InvalidInput):
            parse_config({"host": "h1", **bad})
