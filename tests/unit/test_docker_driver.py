"""The Docker driver against the real IPAM API in-process, with fake links and a fake dockerd.

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
from fastapi.testclient import TestClient

from netd.agent.config import AgentConfig, parse_config
from netd.agent.docker import PluginServer
from netd.agent.docker_api import DockerUnreachable
from netd.agent.docker_driver import PENDING, DockerDriver, PluginError
from netd.agent.state import StateStore
from netd.errors import InvalidInput, Unavailable
from netd.ipam.api import create_app
from netd.ipam.client import Client
from netd.ipam.metrics import Metrics
from netd.ipam.service import IPAM, PoolSpec
from netd.ipam.store import open_store

NID = "n" * 64
MAC = "02:42:c6:12:00:05"
GW_OPTS = {"RequestAddressType": "com.docker.network.gateway"}


class FakeLinks:
    def __init__(self) -> None:
        self.pairs: dict[str, tuple[str, str]] = {}
        self.stray: set[str] = set()
        self.announced: list[tuple[str, str]] = []

    def names(self, endpoint_id: str) -> tuple[str, str]:
        return f"ndd{endpoint_id[:12]}", f"ndp{endpoint_id[:12]}"

    def create_pair(self, endpoint_id: str, bridge: str, mac: str) -> tuple[str, str]:
        self.pairs[endpoint_id] = self.names(endpoint_id)
        return self.pairs[endpoint_id]

    def delete_pair(self, endpoint_id: str) -> bool:
        return self.pairs.pop(endpoint_id, None) is not None

    def present(self) -> list[str]:
        return [p[0] for p in self.pairs.values()] + sorted(self.stray)

    def remove(self, name: str) -> None:
        self.stray.discard(name)

    def announce(self, sandbox: str, docker_pid: int, host_ifname: str, mac: str, ip: str,
                 stop: threading.Event) -> bool:
        self.announced.append((ip, mac))
        return True


class FakeDocker:
    def __init__(self) -> None:
        self.names: dict[str, str] = {}  # endpoint id -> container name
        self.networks: set[str] = {NID}
        self.asking: dict[str, str] = {}  # container name -> --ip
        self.down = False

    def network(self, network_id: str) -> dict[str, Any] | None:
        if self.down:
            raise DockerUnreachable("dockerd is down")
        if network_id not in self.networks:
            return None
        return {"Containers": {f"c-{eid}": {"EndpointID": eid, "Name": name}
                               for eid, name in self.names.items()}}

    def endpoint_name(self, network_id: str, endpoint_id: str) -> str | None:
        return None if self.down else self.names.get(endpoint_id)

    def container_asks_for(self, name: str, ip: str) -> bool:
        return self.asking.get(name) == ip


class FlakyIpam:
    """The real client, which can be made unreachable."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.down = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise Unavailable("cannot reach IPAM server at http://ipam: down")
            return method(*args, **kwargs)

        return call


@pytest.fixture
def ipam() -> Iterator[IPAM]:
    store = open_store("sqlite://:memory:")
    service = IPAM(store)
    service.create_pool(PoolSpec(name="lab", cidr="198.18.0.0/24", gateway="198.18.0.1",
                                 reserved=["198.18.0.1-198.18.0.49"],
                                 routes=[{"dst": "10.200.0.0/16"},
                                         {"dst": "10.201.0.0/16", "gw": "198.18.0.2"}]))
    service.create_pool(PoolSpec(name="tiny", cidr="198.18.9.0/30"))
    yield service
    store.close()


@pytest.fixture
def client(ipam: IPAM) -> Iterator[FlakyIpam]:
    with TestClient(create_app(ipam, None, Metrics()), base_url="http://ipam") as tc:
        c = Client("http://ipam", actor="agent:h1")
        c._http = tc
        yield FlakyIpam(c)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateStore]:
    st = StateStore(str(tmp_path / "state"))
    yield st
    st.close()


@pytest.fixture
def docker() -> FakeDocker:
    return FakeDocker()


@pytest.fixture
def links() -> FakeLinks:
    return FakeLinks()


@pytest.fixture
def driver(client: FlakyIpam, state: StateStore, docker: FakeDocker,
           links: FakeLinks) -> DockerDriver:
    cfg = AgentConfig(host="h1")
    d = DockerDriver(cfg, client, state, docker=docker, links=links)  # type: ignore[arg-type]
    d.name_timeout = 0.5
    return d


def call(driver: DockerDriver, method: str, req: dict[str, Any] | None = None) -> dict[str, Any]:
    return driver.call(method, req or {}, 4242)


def refused(driver: DockerDriver, method: str, req: dict[str, Any]) -> PluginError:
    with pytest.raises(PluginError) as info:
        driver.call(method, req, 4242)
    assert info.value.message.startswith("netd: ")
    return info.value


def allocations(ipam: IPAM) -> dict[str, Any]:
    return {str(__import__("ipaddress").ip_address(a.ip)): a for a, _ in ipam.addresses()}


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


def test_docker_run_and_rm(driver: DockerDriver, ipam: IPAM, state: StateStore,
                           docker: FakeDocker, links: FakeLinks) -> None:
    create_network(driver)
    eid = "e1" * 32
    docker.names[eid] = "web"
    joined = start_endpoint(driver, eid)
    assert joined["InterfaceName"] == {"SrcName": f"ndp{eid[:12]}", "DstPrefix": "eth"}
    assert joined["Gateway"] == "198.18.0.1"
    assert joined["StaticRoutes"] == [
        {"Destination": "10.200.0.0/16", "RouteType": 0, "NextHop": "198.18.0.1"},
        {"Destination": "10.201.0.0/16", "RouteType": 0, "NextHop": "198.18.0.2"}]
    assert joined["Address"] == "198.18.0.50/24"
    assert driver.wait_idle()
    a = allocations(ipam)["198.18.0.50"]
    assert (a.container_id, a.ifname, a.mac, a.host) == (eid, "eth0", MAC, "h1")
    assert a.labels == {"netd.plugin": "docker", "docker.network": NID[:12],
                        "container_name": "web"}
    assert links.announced == [("198.18.0.50", MAC)]
    assert state.docker_endpoint(eid).container_name == "web"  # type: ignore[union-attr]
    info = call(driver, "NetworkDriver.EndpointOperInfo", {"NetworkID": NID, "EndpointID": eid})
    assert info["Value"]["netd.pool"] == "lab"

    stop_endpoint(driver, eid, joined["Address"])
    assert allocations(ipam) == {}
    assert links.pairs == {}
    assert state.docker_endpoints() == [] and state.docker_addresses() == []
    # Docker repeating itself is harmless
    stop_endpoint(driver, eid, joined["Address"])


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
    assert state.docker_endpoints() == []
    assert [(p.container_id, p.ifname) for p in state.pending()] == [("e5" * 32, "eth0")]
    assert "198.18.0.50" in allocations(ipam)  # until the agent's flusher sends it


# --- restart --------------------------------------------------------------------------------


def test_reconcile_repairs_what_a_crash_left(driver: DockerDriver, ipam: IPAM,
                                             state: StateStore, docker: FakeDocker,
                                             links: FakeLinks, client: FlakyIpam) -> None:
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
    links.stray.add("nddstray000000")
    assert driver.wait_idle()

    fresh = DockerDriver(AgentConfig(host="h1"), client, state, docker=docker,  # type: ignore[arg-type]
                         links=links)
    done = fresh.reconcile()
    assert any("gone from dockerd" in line for line in done), done
    owners = {a.container_id for a in allocations(ipam).values()}
    assert owners == {live, "cni-owned"}
    assert [e.endpoint_id for e in state.docker_endpoints()] == [live]
    assert links.present() == [f"ndd{live[:12]}"]
    # dockerd unreachable: its endpoints are kept as they are
    docker.down = True
    assert fresh.reconcile() == []
    assert [e.endpoint_id for e in state.docker_endpoints()] == [live]
    # the network is gone from dockerd: everything of it goes
    docker.down = False
    docker.networks.clear()
    fresh.reconcile()
    assert state.docker_endpoints() == [] and state.docker_networks() == []
    assert {a.container_id for a in allocations(ipam).values()} == {"cni-owned"}


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
