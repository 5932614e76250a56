"""The agent refuses what is not a container, against a real agent (issue 8).

A one-host lab; the tests act as the runtime (exec /opt/cni/bin/netd-cni). Each
refusal is checked for what it must not change: no IPAM event (nothing allocated,
reserved or marked duplicate), no record, no new interface on the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netd.cni import server as agent_server
from tests.support.cnilab import (
    NETD_CNI,
    CniRun,
    Lab,
    add_netns,
    del_netns,
    links,
    netd_conf,
    run_plugin,
    running_lab,
    wait_for,
)

pytestmark = [pytest.mark.real, pytest.mark.slow]
NOBODY = 65534


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("hard"), "hd", hosts=1) as the_lab:
        yield the_lab


def cni(lab: Lab, command: str, cid: str, netns: str | None, **kw: str) -> CniRun:
    conf = netd_conf(f"{lab.prefix}-hard", lab.socket("h1"))
    return run_plugin(NETD_CNI, command, conf, container_id=cid, netns=netns, **kw)


@contextlib.contextmanager
def unchanged(lab: Lab) -> Iterator[None]:
    """The block changes nothing: no IPAM event, no record, no host interface."""
    event, host_links = lab.last_event(), set(links(lab.ns("h1")))
    records = lab.agent_status("h1")["attachments"]
    yield
    assert lab.last_event() == event, "the IPAM changed"
    assert set(links(lab.ns("h1"))) == host_links, "an interface appeared on the host"
    assert lab.agent_status("h1")["attachments"] == records


def test_the_hosts_own_namespace_is_refused_with_4(lab: Lab) -> None:
    """Every way of naming the agent's own namespace (and init's): code 4, nothing made.
    0.1.0 plumbed eth0 into the host and, with the probe on, marked three addresses
    duplicate on each attempt."""
    h1 = lab.ns("h1")
    pid = lab.agent_pid("h1")
    ways = [f"/run/netns/{h1}", h1, f"/proc/{pid}/ns/net", "/proc/self/ns/net",
            f"/proc/{pid}/task/{pid}/ns/net", "/proc/1/ns/net", "/proc/thread-self/ns/net"]
    with unchanged(lab):
        for n, netns in enumerate(ways):
            r = cni(lab, "ADD", f"{lab.prefix}-self{n}", netns)
            assert r.code == 4, (netns, str(r))
            # init's may not even be open to root (a sandboxed machine, like these VMs)
            assert "host's own network namespace" in r.doc["msg"] or (
                netns == "/proc/1/ns/net" and "cannot be opened" in r.doc["msg"]), (netns, r.doc)
        for relative in ("proc/self/ns/net", "../../proc/self/ns/net", "./x"):
            r = cni(lab, "ADD", f"{lab.prefix}-rel", relative)
            assert r.code == 4 and "relative path" in r.doc["msg"], (relative, str(r))


def test_what_is_not_a_namespace_is_4_and_what_is_missing_3(lab: Lab) -> None:
    """0.1.0: a regular file, a directory or /dev/null gave 100 "internal error"."""
    where = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}-nsf-", dir="/tmp"))
    try:
        (where / "file").write_text("not a namespace\n")
        with unchanged(lab):
            for netns in (str(where / "file"), str(where), "/dev/null", "/proc/self/ns/mnt",
                          "/proc/self/ns/uts"):
                r = cni(lab, "ADD", f"{lab.prefix}-nsf", netns)
                assert r.code == 4, (netns, str(r))
            for netns in (str(where / "nope"), f"{lab.prefix}-no-such-netns"):
                r = cni(lab, "ADD", f"{lab.prefix}-nsf", netns)
                assert r.code == 3, (netns, str(r))
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_container_ids_beyond_the_limit_are_4_and_the_longest_works(lab: Lab) -> None:
    """0.1.0: 256 characters wedged the record in "deleting" (every DEL 105, the next agent
    start exited); 250-255 failed at the interface alias with 104."""
    name = lab.ns("kid")
    netns = add_netns(name)
    try:
        with unchanged(lab):
            for length in (201, 250, 255, 256, 300):
                cid = ("k" * length)
                r = cni(lab, "ADD", cid, netns)
                assert r.code == 4 and "CNI_CONTAINERID" in r.doc["msg"], (length, str(r))
                assert cni(lab, "DEL", cid, netns).code == 4
        longest = (lab.prefix + "-" + "l" * 200)[:200]
        assert cni(lab, "ADD", longest, netns).rc == 0
        assert "eth0" in links(name)
        assert lab.by_container()[longest]["ifname"] == "eth0"
        assert cni(lab, "DEL", longest, netns).rc == 0
        assert longest not in lab.by_container()
        lab.restart_agent("h1")  # and the agent starts
    finally:
        del_netns(name)


def test_interface_names_count_bytes_and_refuse_control_characters(lab: Lab) -> None:
    name = lab.ns("kif")
    netns = add_netns(name)
    try:
        with unchanged(lab):
            for ifname in ("\u00e9" * 8, "eth\x010", "eth\u202e0"):
                r = cni(lab, "ADD", f"{lab.prefix}-kif", netns, ifname=ifname)
                assert r.code == 4 and "CNI_IFNAME" in r.doc["msg"], (ifname, str(r))
    finally:
        del_netns(name)


@pytest.mark.parametrize("front", ["native", "python"])
def test_a_caller_who_is_not_root_is_5_not_11(lab: Lab, front: str) -> None:
    """0.1.0: the native front said 11 (runtimes retry), the Python shim 4."""
    where = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}-nb-", dir="/tmp"))
    try:
        os.chmod(where, 0o755)
        plugin = where / "netd-cni"
        shutil.copy(NETD_CNI, plugin)
        argv = [str(plugin)]
        if front == "python":  # the fallback as install-cni writes it, run on its own
            argv = ["/usr/bin/python3", "-I", "-S", str(Path("cni/shim.py").resolve())]
        conf = netd_conf(f"{lab.prefix}-hard", lab.socket("h1"))
        env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "nb",
               "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0", "CNI_PATH": str(where)}
        with unchanged(lab):
            proc = subprocess.run(argv, input=json.dumps(conf).encode(),
                                  env=env, user=NOBODY, group=NOBODY, capture_output=True,
                                  timeout=60)
        doc = json.loads(proc.stdout)
        assert (proc.returncode, doc["code"]) == (1, 5), proc
        assert "permission denied" in doc["msg"]
    finally:
        shutil.rmtree(where, ignore_errors=True)


def agent_threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def test_silent_connections_pin_a_bounded_number_of_threads(lab: Lab) -> None:
    """1,000 connections that never send: 0.1.0 pinned 1,004 threads. The agent serves at
    most MAX_CONNECTIONS at once, answers the rest 11 at once, closes each silent one
    after READ_TIMEOUT, and goes on serving."""
    pid, path = lab.agent_pid("h1"), lab.socket("h1")
    before = agent_threads(pid)
    silent: list[socket.socket] = []
    try:
        for _ in range(1000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            silent.append(s)
            while True:
                try:
                    s.connect(path)  # blocking: waits while the accept queue is full
                    break
                except BlockingIOError:
                    time.sleep(0.001)
            s.settimeout(30)
        peak = agent_threads(pid)
        assert peak <= before + agent_server.MAX_CONNECTIONS + 4, (before, peak)
        told = sum(b'"code": 11' in s.recv(4096) for s in silent[agent_server.MAX_CONNECTIONS:])
        assert told >= 1000 - agent_server.MAX_CONNECTIONS - 4
        started = time.monotonic()
        closed = sum(s.recv(4096) == b"" for s in silent[:agent_server.MAX_CONNECTIONS])
        assert closed >= agent_server.MAX_CONNECTIONS - 4
        assert time.monotonic() - started < agent_server.READ_TIMEOUT + 5
    finally:
        for s in silent:
            s.close()
    wait_for("the agent's threads back", lambda: agent_threads(pid) <= before + 4, 15)
    assert lab.agent_ready("h1")
