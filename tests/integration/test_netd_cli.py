"""``netd ipam serve`` and ``netd install-cni`` as real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import bin_path, free_port, start_server

pytestmark = pytest.mark.real


def netd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([bin_path("netd"), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become healthy")


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "nope"], "--listen: 'nope' is not HOST:PORT"),
    (["--listen", "127.0.0.1:0"], "port must be 1-65535"),
    (["--listen", "127.0.0.1:70000"], "port must be 1-65535"),
    (["--listen", "::1:9650"], "[ADDR]:PORT"),
    (["--vlan-range", "10"], "--vlan-range: '10' is not LO-HI"),
    (["--vlan-range", "0-5"], "need 1 <= LO <= HI <= 4094"),
    (["--vlan-range", "20-10"], "need 1 <= LO <= HI <= 4094"),
    (["--store", "mysql://db/ipam"], "unknown store URL"),
    (["--token-file", "/nonexistent/token"], "cannot read token file /nonexistent/token"),
    (["--cooldown", "-1"], "-1"),
])
def test_serve_bad_flags(tmp_path: Path, args: list[str], message: str) -> None:
    base = ["--listen", f"127.0.0.1:{free_port()}", "--store", f"sqlite:///{tmp_path}/db"]
    r = netd("ipam", "serve", *base, *args)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root`` (links not followed): mode and content."""
    out: dict[str, tuple[int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data = b"" if not stat.S_ISREG(st.st_mode) else path.read_bytes()
        out[str(path.relative_to(root))] = (st.st_mode, data)
    return out


@pytest.mark.parametrize(("url", "message"), [
    ("sqlite://{rel}/ipam.db", "names a relative path"),
    ("sqlite:ipam.db", "names a relative path"),
    ("sqlite://admin:s3cret@/{dir}/new.db", "carries user info"),
    ("sqlite:///{dir}/other.db?mode=ro", "takes none"),
    ("sqlite:///{dir}/new.db?cache=shared", "takes none"),
    ("sqlite:///{dir}/link.db", "is a symbolic link"),
    ("sqlite:///{dir}/other.db", "is a SQLite database of something else"),
    ("sqlite:///{dir}/notes.txt", "is not a SQLite database"),
    ("sqlite:///{dir}/sub", "is not a regular file"),
    ("sqlite:///{dir}/", "names no database file"),
])
def test_serve_refuses_store_urls_and_changes_nothing(tmp_path: Path, url: str,
                                                      message: str) -> None:
    """0.1.0: ?mode=ro was ignored, a symlink's target chmod'ed and given netd's tables, a
    text file gave a traceback. Each is a one-line error, and nothing is created or changed."""
    import sqlite3
    d = tmp_path / "data"
    d.mkdir()
    (d / "sub").mkdir()
    (d / "notes.txt").write_text("not a database\n")
    db = sqlite3.connect(d / "other.db")
    db.execute("CREATE TABLE users (name TEXT)")
    db.commit()
    db.close()
    (d / "other.db").chmod(0o644)
    (d / "link.db").symlink_to(d / "other.db")
    before = tree(tmp_path)
    r = subprocess.run([bin_path("netd"), "ipam", "serve", "--listen", f"127.0.0.1:{free_port()}",
                        "--store", url.format(dir=d, rel="data")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "s3cret" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert tree(tmp_path) == before


def test_serve_refuses_a_memory_store_with_workers(tmp_path: Path) -> None:
    """0.1.0: each worker had its own database: one pool created twice, addresses twice."""
    r = netd("ipam", "serve", "--listen", f"127.0.0.1:{free_port()}", "--store",
             "sqlite://:memory:", "--workers", "2")
    assert r.returncode != 0
    assert "gives each worker a database of its own" in r.stderr, r.stderr


def test_serve_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = netd("ipam", "serve", "--listen", f"127.0.0.1:{port}",
                 "--store", f"sqlite:///{tmp_path}/db")
    assert r.returncode == 1
    assert f"Error: cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr


def test_empty_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("\n")
    r = netd("ipam", "serve", "--listen", f"127.0.0.1:{free_port()}",
             "--store", f"sqlite:///{tmp_path}/db", "--token-file", str(token))
    assert r.returncode == 1 and "is empty" in r.stderr


def test_serve_without_token_and_sigterm(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [bin_path("netd"), "ipam", "serve", "--listen", f"127.0.0.1:{port}",
             "--store", f"sqlite:///{tmp_path}/db", "--vlan-range", "300-301"],
            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        # no token configured: mutations are open; --vlan-range bounds 'auto'
        for name, cidr, vlan in (("p1", "10.90.0.0/24", 300), ("p2", "10.90.1.0/24", 301)):
            r = httpx.post(url + "/v1/pools", json={"name": name, "cidr": cidr, "vlan": "auto"})
            assert r.status_code == 201 and r.json()["vlan"] == vlan
        r = httpx.post(url + "/v1/pools", json={"name": "p3", "cidr": "10.90.2.0/24",
                                                "vlan": "auto"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "pool_exhausted"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "anyone who reaches the API may read and change it" in text
    assert "netd ipam stopped" in text
    assert "Traceback" not in text


def test_world_readable_token_warns(tmp_path: Path) -> None:
    srv = start_server(tmp_path)
    srv.stop()
    token = tmp_path / "open-token"
    token.write_text("secret-token\n")
    token.chmod(0o644)
    port = free_port()
    log = tmp_path / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [bin_path("netd"), "ipam", "serve", "--listen", f"127.0.0.1:{port}",
             "--store", f"sqlite:///{tmp_path}/db2", "--token-file", str(token)],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/pools",
                       json={"name": "p", "cidr": "10.91.0.0/24"},
                       headers={"Authorization": "Bearer secret-token"})
        assert r.status_code == 201
    finally:
        proc.terminate()
        proc.wait(15)
    text = log.read_text()
    assert "accessible by group or others" in text
    assert "secret-token" not in text


def test_install_cni(tmp_path: Path) -> None:
    bin_dir = tmp_path / "opt" / "cni" / "bin"
    r = netd("install-cni", "--bin-dir", str(bin_dir))
    assert r.returncode == 0, r.stderr
    for name in ("netd-cni", "netd-ipam"):
        path = bin_dir / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
        # CNI runtimes call plugins with a bare environment
        run = subprocess.run([str(path)], capture_output=True, text=True,
                             env={"CNI_COMMAND": "VERSION"}, input="{}", timeout=30,
                             check=False)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "cniVersion" in json.loads(run.stdout)
    # re-installing is idempotent
    assert netd("install-cni", "--bin-dir", str(bin_dir)).returncode == 0
    assert sorted(os.listdir(bin_dir)) == ["netd-cni", "netd-ipam"]


def test_install_cni_unwritable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = netd("install-cni", "--bin-dir", str(blocker / "bin"))
    assert r.returncode == 1
    assert r.stderr.startswith("Error: cannot install into")
    assert len(r.stderr.strip().splitlines()) == 1


def reader_pids(server_pid: int) -> list[int]:
    """The server's listing reader processes (its spawned children)."""
    out = []
    for pid in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split():
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"multiprocessing.spawn" in cmd:
            out.append(int(pid))
    return out


def test_listing_reader_process_is_nicer_replaced_and_dies_with_the_server(
        tmp_path: Path) -> None:
    """Listings are built by a reader process of lower priority (so a flood of them does
    not delay allocations: tests/bench/ipam_bench.py). It is replaced when it dies and
    dies with the server, kill -9 included."""
    srv = start_server(tmp_path)
    headers = {"Authorization": f"Bearer {srv.token}"}
    try:
        readers = reader_pids(srv.proc.pid)
        assert len(readers) == 1
        assert os.getpriority(os.PRIO_PROCESS, readers[0]) == 10
        httpx.post(f"{srv.url}/v1/pools", json={"name": "p", "cidr": "10.91.0.0/24"},
                   headers=headers).raise_for_status()
        for n in range(3):
            httpx.post(f"{srv.url}/v1/allocate", json={"pool": "p", "container_id": f"c{n}"},
                       headers=headers).raise_for_status()
        page = httpx.get(f"{srv.url}/v1/addresses", params={"pool": "p"}, headers=headers)
        assert [a["container_id"] for a in page.json()["addresses"]] == ["c0", "c1", "c2"]
        os.kill(readers[0], signal.SIGKILL)
        time.sleep(0.2)
        again = httpx.get(f"{srv.url}/v1/addresses", params={"pool": "p"}, headers=headers)
        assert again.status_code == 200 and again.json() == page.json()
        replaced = reader_pids(srv.proc.pid)
        assert len(replaced) == 1 and replaced != readers
        srv.proc.kill()
        srv.proc.wait()
        deadline = time.monotonic() + 5
        while Path(f"/proc/{replaced[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{replaced[0]}").exists(), "the reader outlived the server"
    finally:
        srv.stop()
