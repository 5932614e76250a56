"""The etcd store's security and housekeeping against a real etcd 3.4 of its own.

etcd authentication (a user with read-write on netd's prefix only, the
password from a file), TLS with client certificates (a CA, server and client
certificates made with openssl for this test), and compaction under a
transaction whose pinned revision goes away.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from aetcd import rpc

from netd.errors import Unavailable
from netd.ipam.etcd_kv import EtcdClient, Retry, Stm, prefix_end
from netd.ipam.etcd_store import EtcdStore
from netd.ipam.service import IPAM, AllocRequest, PoolSpec
from tests.conftest import require
from tests.support import etcd

pytestmark = [pytest.mark.real, pytest.mark.slow]

PREFIX = "/netd/ipam/"


@pytest.fixture
def member(tmp_path: Path) -> Iterator[etcd.EtcdCluster]:
    require(etcd.ensure_etcd(), "etcd is missing (apt-get install etcd-server)")
    c = etcd.EtcdCluster(tmp_path / "etcd", size=1, tag=f"ns{secrets.token_hex(3)}")
    c.start()
    try:
        yield c
    finally:
        c.stop()


def enable_auth(endpoint: str, password: str) -> None:
    """root (needed to enable auth) and netd, with read-write on netd's prefix only."""
    auth = rpc.AuthStub(grpc.insecure_channel(endpoint))
    auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=secrets.token_hex(8)), timeout=5)
    auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
    auth.UserAdd(rpc.AuthUserAddRequest(name="netd", password=password), timeout=5)
    auth.RoleAdd(rpc.AuthRoleAddRequest(name="netd"), timeout=5)
    perm = rpc.Permission(permType=rpc.Permission.READWRITE, key=PREFIX.encode(),
                          range_end=prefix_end(PREFIX.encode()))
    auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name="netd", perm=perm),
                             timeout=5)
    auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="netd", role="netd"), timeout=5)
    auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)


def test_authentication_with_a_password_file(member: etcd.EtcdCluster, tmp_path: Path) -> None:
    password = secrets.token_hex(12)
    enable_auth(member.endpoints[0], password)
    pw = tmp_path / "etcd.pass"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    url = member.url(PREFIX) + f"?user=netd&password_file={pw}"
    store = EtcdStore(url)
    ipam = IPAM(store)
    ipam.create_pool(PoolSpec(name="p", cidr="10.113.0.0/24"))
    a, _ = ipam.allocate(AllocRequest(pool="p", container_id="c1", host="h1"))
    assert ipam.show("10.113.0.2")["container_id"] == "c1" and a.ip
    store.close()
    # no credentials, or the wrong password: a clear refusal, nothing written
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("wrong\n")
    for bad in (member.url(PREFIX), member.url(PREFIX) + f"?user=netd&password_file={wrong}"):
        other = EtcdStore(bad)
        with pytest.raises(Unavailable) as info:
            IPAM(other).allocate(AllocRequest(pool="p", container_id="c2", host="h1"))
        print(f"\n{bad.split('?')[-1][:30]}: {info.value.message}")
        assert "etcd refused" in info.value.message
        other.close()
    store = EtcdStore(url)
    assert [x.container_id for x, _ in IPAM(store).addresses(pool="p")] == ["c1"]
    store.close()
    # and netd's user reaches nothing outside its prefix
    client = EtcdClient(member.endpoints, user="netd", password=password)
    with pytest.raises(Unavailable):
        client.put(b"/elsewhere/x", b"1")
    client.close()


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    require(etcd.ensure_etcd(), "etcd is missing (apt-get install etcd-server)")
    d = tmp_path / "pki"
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ca",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"),
                      ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
                "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))
    c = etcd.EtcdCluster(tmp_path / "etcd", size=1, tag=f"nt{secrets.token_hex(3)}",
                         tls=(d / "ca.pem", d / "server.pem", d / "server.key"),
                         client_tls=(d / "client.pem", d / "client.key"))
    c.start()
    try:
        url = (c.url(PREFIX) + f"?cacert={d / 'ca.pem'}&cert={d / 'client.pem'}"
               f"&key={d / 'client.key'}")
        store = EtcdStore(url)
        ipam = IPAM(store)
        ipam.create_pool(PoolSpec(name="p", cidr="10.114.0.0/24"))
        a, _ = ipam.allocate(AllocRequest(pool="p", container_id="c1", host="h1"))
        assert a.container_id == "c1"
        store.close()
        # without a client certificate the member refuses the connection
        bare = EtcdStore(c.url(PREFIX) + f"?cacert={d / 'ca.pem'}&timeout=0.5")
        bare.client.budget = 2.0
        with pytest.raises(Unavailable):
            IPAM(bare).get_pool("p")
        bare.close()
    finally:
        c.stop()


def test_a_transaction_whose_revision_was_compacted_runs_again(
        member: etcd.EtcdCluster) -> None:
    store = EtcdStore(member.url(PREFIX))
    ipam = IPAM(store)
    ipam.create_pool(PoolSpec(name="p", cidr="10.115.0.0/24"))
    stm = Stm(store.client)
    assert stm.get(f"{PREFIX}pool/p".encode())  # pins the revision
    for i in range(5):
        store.client.put(f"{PREFIX}junk/{i}".encode(), b"x")
    latest = store.client.range(b"/").revision
    store.client.compact(latest)
    with pytest.raises(Retry):
        stm.get(f"{PREFIX}pool/nothing".encode())  # at the compacted revision
    # a change meeting that runs again on fresh reads: compact while it runs, once
    compacted = []

    def change(tx: object) -> object:
        got = tx.get_pool("p")  # type: ignore[attr-defined]
        if not compacted:
            store.client.put(f"{PREFIX}junk/x".encode(), b"y")
            store.client.compact(store.client.range(b"/").revision)
            compacted.append(True)
        tx.list_pools()  # type: ignore[attr-defined]
        return got

    assert store.transact(change).name == "p"
    a, _ = ipam.allocate(AllocRequest(pool="p", container_id="c1", host="h1"))
    assert a.container_id == "c1"
    store.close()
