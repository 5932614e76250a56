"""The CNI plugin shim (cni/shim.py) as runtimes run it: a real process, exec'd.

The agent on the other end of the socket is a fake here (a unix socket server
thread that records requests and answers canned JSON): the shim is the
component under test; the real agent is exercised by the integration tests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netd.cli.main import plugin_script
from netd.cni import shim

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "cni" / "shim.py"
VENV_BIN = Path(sys.executable).parent
# netd install-cni prefers the distribution's python3 (it starts faster)
PYTHON = ("/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK)
          else os.path.realpath(sys.executable))
SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]

Answer = dict[str, Any] | bytes | Callable[[dict[str, Any]], dict[str, Any] | bytes]


class FakeAgent:
    """One-request-per-connection unix socket server answering canned JSON."""

    def __init__(self, path: Path, answer: Answer) -> None:
        self.path = path
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            with conn:
                data = b""
                while b"\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                request = json.loads(data.partition(b"\n")[0])
                self.requests.append(request)
                answer = self.answer(request) if callable(self.answer) else self.answer
                payload = answer if isinstance(answer, bytes) else \
                    json.dumps(answer).encode() + b"\n"
                conn.sendall(payload)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # short: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer
    path = Path(tempfile.mkdtemp(prefix="netd-shim-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(sockdir: Path) -> Iterator[Callable[[Answer], FakeAgent]]:
    made: list[FakeAgent] = []

    def start(answer: Answer) -> FakeAgent:
        fake = FakeAgent(sockdir / f"agent{len(made)}.sock", answer)
        made.append(fake)
        return fake

    yield start
    for fake in made:
        fake.close()


# The ways the plugin gets executed: the file itself under a bare interpreter
# (no site-packages, as 'netd install-cni' installs it), and the console script.
LAUNCHERS: dict[str, list[str]] = {
    "shim.py": [PYTHON, "-I", "-S", str(SHIM)],
    "console-script": [str(VENV_BIN / "netd-cni")],
}


def run(argv: list[str], command: str | None, stdin: str | bytes = b"",
        **cni_env: str) -> tuple[int, str, str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **cni_env}
    if command is not None:
        env["CNI_COMMAND"] = command
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(argv, input=data, env=env, capture_output=True, timeout=60)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def netconf(sock: Path | str, version: str = "1.0.0", **extra: Any) -> str:
    return json.dumps({"cniVersion": version, "name": "podnet", "type": "netd-cni",
                       "pool": "rack1", "agentSocket": str(sock), **extra})


ATTACH = {"CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/var/run/netns/c1", "CNI_IFNAME": "eth0",
          "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web", "CNI_PATH": "/opt/cni/bin"}

RESULT = {"cniVersion": "1.0.0",
          "interfaces": [{"name": "eth0", "mac": "02:00:c6:12:00:0a",
                          "sandbox": "/var/run/netns/c1"}],
          "ips": [{"address": "198.18.0.10/24", "gateway": "198.18.0.1", "interface": 0}]}


# --- VERSION, and what is answered without the agent --------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_version(launcher: str, version: str) -> None:
    code, out, err = run(LAUNCHERS[launcher], "VERSION", json.dumps({"cniVersion": version}))
    assert code == 0, err
    assert json.loads(out) == {"cniVersion": version, "supportedVersions": SUPPORTED}
    assert err == ""


@pytest.mark.parametrize("stdin", [b"", b"{}", b"not json", b"[]", b'{"cniVersion": 3}'])
def test_version_without_a_usable_request_version(stdin: bytes) -> None:
    code, out, _ = run(LAUNCHERS["shim.py"], "VERSION", stdin)
    assert code == 0
    assert json.loads(out) == {"cniVersion": "1.1.0", "supportedVersions": SUPPORTED}


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("stdin", [b"", b"{", b"not json", b"[1, 2]", b'"x"',
                                   b'{"a": 1} trailing', b"\xff\xfe{}"])
def test_undecodable_stdin_is_code_6(launcher: str, stdin: bytes, agent: Any) -> None:
    fake = agent({"result": {}})
    code, out, _ = run(LAUNCHERS[launcher], "ADD", stdin, **ATTACH)
    assert code == 1
    doc = json.loads(out)
    assert doc["code"] == 6
    assert doc["cniVersion"] == "1.1.0"
    assert doc["msg"] and "details" in doc
    assert fake.requests == []


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("command", [None, "", "add", "FOO"])
def test_bad_cni_command_is_code_4(launcher: str, command: str | None) -> None:
    code, out, _ = run(LAUNCHERS[launcher], command, netconf("/nonexistent.sock"))
    assert code == 1
    doc = json.loads(out)
    assert doc["code"] == 4
    assert "CNI_COMMAND" in doc["msg"]
    assert set(doc) == {"cniVersion", "code", "msg", "details"}


def test_invalid_agent_socket_is_code_7() -> None:
    code, out, _ = run(LAUNCHERS["shim.py"], "ADD", netconf("/x", agentSocket=5), **ATTACH)
    assert code == 1
    assert json.loads(out)["code"] == 7


# --- forwarding -----------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_add_is_forwarded_and_the_result_printed(launcher: str, agent: Any) -> None:
    fake = agent({"result": RESULT})
    stdin = netconf(fake.path, runtimeConfig={"ips": ["198.18.0.10/24"]}, dns={"domain": "é"})
    code, out, err = run(LAUNCHERS[launcher], "ADD", stdin, **ATTACH, CNI_OTHER="x")
    assert (code, err) == (0, "")
    assert json.loads(out) == RESULT
    assert out.endswith("\n")
    assert fake.requests == [{"plugin": "netd-cni", "command": "ADD", "env": ATTACH,
                              "config": json.loads(stdin)}]


@pytest.mark.parametrize("command", ["DEL", "CHECK", "GC", "STATUS"])
def test_other_commands_are_forwarded(command: str, agent: Any) -> None:
    fake = agent({"result": {}})
    env = {} if command in ("GC", "STATUS") else {"CNI_CONTAINERID": "c0ffee",
                                                  "CNI_IFNAME": "eth0"}
    code, out, _ = run(LAUNCHERS["shim.py"], command, netconf(fake.path, "1.1.0"), **env)
    assert (code, out) == (0, "")  # an empty result prints nothing
    assert fake.requests[0]["command"] == command
    assert fake.requests[0]["env"] == env


def test_ipam_plugin_by_name(agent: Any, sockdir: Path) -> None:
    fake = agent({"result": {"cniVersion": "0.4.0", "ips": [
        {"version": "4", "address": "198.18.0.10/24"}]}})
    config = json.dumps({"cniVersion": "0.4.0", "name": "br", "type": "bridge",
                         "agentSocket": "/not/this/one.sock",
                         "ipam": {"type": "netd-ipam", "pool": "rack1",
                                  "agentSocket": str(fake.path)}})
    link = sockdir / "netd-ipam"
    link.symlink_to(SHIM)
    for argv in ([PYTHON, "-I", "-S", str(link)], [str(VENV_BIN / "netd-ipam")]):
        code, out, err = run(argv, "ADD", config, **ATTACH)
        assert code == 0, out + err
        assert json.loads(out)["ips"][0]["address"] == "198.18.0.10/24"
    assert [r["plugin"] for r in fake.requests] == ["netd-ipam", "netd-ipam"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_agent_error_is_printed_with_cni_version(launcher: str, agent: Any) -> None:
    fake = agent({"error": {"code": 101, "msg": "pool 'rack9' not found",
                            "details": "create it with netctl pool create"}})
    code, out, _ = run(LAUNCHERS[launcher], "ADD", netconf(fake.path, "0.4.0"), **ATTACH)
    assert code == 1
    assert json.loads(out) == {"cniVersion": "0.4.0", "code": 101,
                               "msg": "pool 'rack9' not found",
                               "details": "create it with netctl pool create"}


def test_sloppy_agent_answers(agent: Any) -> None:
    for answer, want_code in [
        ({"error": {"msg": "no code"}}, 100),
        ({"error": {"code": True, "msg": "bool"}}, 100),
        ({"error": {"code": 3}}, 3),
        (b"garbage\n", 5),
        (b'{"neither": 1}\n', 5),
        (b'{"result": []}\n', 5),
    ]:
        fake = agent(answer)
        code, out, _ = run(LAUNCHERS["shim.py"], "DEL", netconf(fake.path), **ATTACH)
        assert code == 1, answer
        doc = json.loads(out)
        assert doc["code"] == want_code, answer
        assert doc["msg"] and doc["cniVersion"] == "1.0.0"


def test_result_without_cni_version_gets_the_requests(agent: Any) -> None:
    fake = agent(b'{"result": {"ips": [{"address": "198.18.0.3/24"}]}}')  # no newline, EOF
    code, out, _ = run(LAUNCHERS["shim.py"], "ADD", netconf(fake.path, "0.3.1"), **ATTACH)
    assert code == 0
    assert json.loads(out) == {"cniVersion": "0.3.1", "ips": [{"address": "198.18.0.3/24"}]}


# --- agent unreachable ------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC"])
def test_agent_missing_is_try_again_later(launcher: str, command: str, sockdir: Path) -> None:
    path = sockdir / "none.sock"
    code, out, _ = run(LAUNCHERS[launcher], command, netconf(path, "1.1.0"), **ATTACH)
    assert code == 1
    doc = json.loads(out)
    assert doc["code"] == 11
    assert doc["msg"] == (f"try again later: netd agent not reachable at {path}: "
                          "No such file or directory")
    assert doc["cniVersion"] == "1.1.0"


def test_agent_missing_on_status_is_50(sockdir: Path) -> None:
    path = sockdir / "none.sock"
    code, out, _ = run(LAUNCHERS["shim.py"], "STATUS", netconf(path, "1.1.0"))
    assert code == 1
    doc = json.loads(out)
    assert doc["code"] == 50
    assert f"netd agent not reachable at {path}" in doc["msg"]


def test_agent_refusing_or_hanging_up(sockdir: Path) -> None:
    # a socket file nobody listens on: connection refused
    dead = sockdir / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()
    code, out, _ = run(LAUNCHERS["shim.py"], "ADD", netconf(dead), **ATTACH)
    assert (code, json.loads(out)["code"]) == (1, 11)
    assert "Connection refused" in json.loads(out)["msg"]

    # an agent that reads the request and hangs up without answering (a crash)
    rude = sockdir / "rude.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(rude))
    srv.listen(1)

    def hang_up() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.close()

    t = threading.Thread(target=hang_up, daemon=True)
    t.start()
    try:
        code, out, _ = run(LAUNCHERS["shim.py"], "STATUS", netconf(rude, "1.1.0"))
    finally:
        t.join(5)
        srv.close()
    doc = json.loads(out)
    assert (code, doc["code"]) == (1, 50)
    assert "closed the connection" in doc["msg"] or "without an answer" in doc["msg"]


def test_agent_too_slow_times_out(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process, with the timeout shortened: the agent accepts and never answers."""
    path = sockdir / "slow.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    monkeypatch.setattr(shim, "OTHER_TIMEOUT", 0.3)
    try:
        started = time.monotonic()
        code, out = shim.handle("netd-cni", {"CNI_COMMAND": "DEL", **ATTACH},
                                lambda: netconf(path).encode())
        assert time.monotonic() - started < 5
    finally:
        srv.close()
    doc = json.loads(out)
    assert (code, doc["code"]) == (1, 11)
    assert "no answer within 0.3 s" in doc["msg"]


# --- in-process pieces ----------------------------------------------------------------------


def test_plugin_kind_from_argv0() -> None:
    assert shim.plugin_from_argv0("/opt/cni/bin/netd-ipam") == "netd-ipam"
    assert shim.plugin_from_argv0("netd-ipam") == "netd-ipam"
    assert shim.plugin_from_argv0("/opt/cni/bin/netd-cni") == "netd-cni"
    assert shim.plugin_from_argv0("/work/cni/shim.py") == "netd-cni"
    assert shim.plugin_from_argv0("") == "netd-cni"


@pytest.mark.parametrize("command", ["VERSION", "ADD"])
def test_shim_imports_nothing_heavy(command: str, sockdir: Path) -> None:
    """Under a bare interpreter the shim loads no json/socket/os (nor re, enum, netd)."""
    proc = subprocess.run([PYTHON, "-I", "-S", "-X", "importtime", str(SHIM)],
                          input=netconf(sockdir / "none.sock").encode(), capture_output=True,
                          timeout=30, env={"CNI_COMMAND": command, **ATTACH})
    assert proc.returncode == (0 if command == "VERSION" else 1)
    imported = {line.rpartition("|")[2].strip() for line in proc.stderr.decode().splitlines()
                if line.startswith("import time:")}
    assert "_json" in imported
    assert not imported & {"json", "socket", "re", "enum", "netd", "typing", "os",
                           "collections"}, imported


def test_without_the_c_json_module(agent: Any) -> None:
    """Where CPython's _json is missing, the shim falls back to json, same answers."""
    fake = agent({"result": RESULT})
    probe = ("import sys, runpy\n"
             "sys.modules['_json'] = None\n"  # makes 'import _json' fail
             f"sys.argv = [{str(SHIM)!r}]\n"
             f"runpy.run_path({str(SHIM)!r}, run_name='__main__')\n")
    for command, stdin, want in [
        ("VERSION", '{"cniVersion": "0.4.0"}', 0),
        ("ADD", netconf(fake.path), 0),
        ("ADD", "{bad", 1),
    ]:
        proc = subprocess.run([PYTHON, "-I", "-S", "-c", probe], input=stdin.encode(),
                              capture_output=True, timeout=30,
                              env={"CNI_COMMAND": command, **ATTACH})
        assert proc.returncode == want, proc.stderr
        doc = json.loads(proc.stdout)
        if command == "VERSION":
            assert doc["cniVersion"] == "0.4.0"
        elif want == 0:
            assert doc == RESULT
        else:
            assert doc["code"] == 6
    assert len(fake.requests) == 1


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() |
    st.floats(allow_nan=False, allow_infinity=False),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
    max_leaves=20))
def test_fast_json_agrees_with_json(value: Any) -> None:
    text = shim.json_dumps(value)
    assert "\n" not in text and text.isascii()
    assert json.loads(text) == value
    assert shim.json_loads(text) == value
    assert shim.json_loads(json.dumps(value, indent=2)) == value


def test_fast_json_errors_are_json_errors() -> None:
    for bad in ("", "{", "[1,]", '{"a": 1} x', "nul", "\x00"):
        with pytest.raises(ValueError):
            shim.json_loads(bad)
    assert shim.json_loads(' \n {"a": [1, 2.5, null, true, "\\u00e9"]} \r\n') == \
        {"a": [1, 2.5, None, True, "é"]}


# --- install-cni ------------------------------------------------------------------------------


def test_plugin_script() -> None:
    source = SHIM.read_text()
    text = plugin_script(source, "/usr/bin/python3")
    first, _, body = text.partition("\n")
    assert first == "#!/usr/bin/python3 -IS"  # one argument on Linux: '-I -S' would not parse
    assert body == source.partition("\n")[2]
    assert plugin_script("print(1)\n", "/p/python3") == "#!/p/python3 -IS\nprint(1)\n"
    for bad in ("python3", "/a b/python3", "/" + "x" * 300):
        with pytest.raises(ValueError):
            plugin_script(source, bad)


def test_install_cni_makes_working_plugins(sockdir: Path, agent: Any) -> None:
    netd = str(VENV_BIN / "netd")
    bin_dir = sockdir / "bin"
    proc = subprocess.run([netd, "install-cni", "--bin-dir", str(bin_dir)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"installed {bin_dir / 'netd-cni'}" in proc.stdout
    assert f"installed {bin_dir / 'netd-ipam'}" in proc.stdout
    assert sorted(p.name for p in bin_dir.iterdir()) == ["netd-cni", "netd-ipam"]
    for name in ("netd-cni", "netd-ipam"):
        path = bin_dir / name
        assert path.stat().st_mode & 0o777 == 0o755
        first, _, body = path.read_text().partition("\n")
        assert first == f"#!{PYTHON} -IS"
        assert body == SHIM.read_text().partition("\n")[2]
        code, out, err = run([str(path)], "VERSION", '{"cniVersion": "0.4.0"}')
        assert (code, err) == (0, "")
        assert json.loads(out)["supportedVersions"] == SUPPORTED

    fake = agent({"result": RESULT})
    code, out, _ = run([str(bin_dir / "netd-cni")], "ADD", netconf(fake.path), **ATTACH)
    assert (code, json.loads(out)) == (0, RESULT)
    ipam_conf = json.dumps({"cniVersion": "1.0.0", "name": "br", "type": "bridge",
                            "ipam": {"type": "netd-ipam", "pool": "p",
                                     "agentSocket": str(fake.path)}})
    code, out, _ = run([str(bin_dir / "netd-ipam")], "DEL", ipam_conf, **ATTACH)
    assert (code, json.loads(out)) == (0, RESULT)
    assert [r["plugin"] for r in fake.requests] == ["netd-cni", "netd-ipam"]

    # idempotent: nothing rewritten, nothing left behind
    inode = (bin_dir / "netd-cni").stat().st_ino
    again = subprocess.run([netd, "install-cni", "--bin-dir", str(bin_dir)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0
    assert again.stdout.count("up to date") == 2
    assert (bin_dir / "netd-cni").stat().st_ino == inode
    # a changed or damaged file is replaced atomically (new inode)
    (bin_dir / "netd-ipam").write_text("#!/bin/sh\nexit 1\n")
    third = subprocess.run([netd, "install-cni", "--bin-dir", str(bin_dir)],
                           capture_output=True, text=True, timeout=60)
    assert third.returncode == 0
    assert f"installed {bin_dir / 'netd-ipam'}" in third.stdout
    assert sorted(p.name for p in bin_dir.iterdir()) == ["netd-cni", "netd-ipam"]
    assert run([str(bin_dir / "netd-ipam")], "VERSION")[0] == 0


def test_install_cni_rejects_a_bad_python(sockdir: Path) -> None:
    proc = subprocess.run([str(VENV_BIN / "netd"), "install-cni", "--bin-dir",
                           str(sockdir / "bin"), "--python", str(sockdir / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "not an executable" in proc.stderr
    assert not (sockdir / "bin").exists()


# --- exec time (measured and printed, not asserted) -----------------------------------------


def test_exec_time_of_version(capsys: pytest.CaptureFixture[str]) -> None:
    def median_ms(argv: list[str], runs: int = 20) -> float:
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run(argv, input=b'{"cniVersion": "1.0.0"}', capture_output=True,
                           env={"CNI_COMMAND": "VERSION"}, check=True)
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    bare = median_ms([PYTHON, "-I", "-S", "-c", "pass"])
    plugin = median_ms([PYTHON, "-I", "-S", str(SHIM)])
    console = median_ms([str(VENV_BIN / "netd-cni")])
    with capsys.disabled():
        print(f"\n[exec time, VERSION, median of 20] python -IS shim.py: {plugin:.1f} ms; "
              f"bare interpreter: {bare:.1f} ms; console script netd-cni: {console:.1f} ms")
