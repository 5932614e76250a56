"""The CNI plugin shim (cni/shim.py) as runtimes run it: a real process, exec'd.

The agent on the other end of the socket is a fake here (a unix socket server
thread that records requests and answers canned JSON): the shim is the
component under test; the real agent is exercised by the integration tests.
"""

from __future__ import annotations

import atexit
import base64
import functools
import json
import os
import re
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

from netd.cni import install as cni_native
from netd.cni import shim
from netd.cni.install import plugin_code, plugin_launcher, plugin_script, precompile_shim
from netd.cni.protocol import render_reply, request_version
from tests.conftest import require

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
        self.renders = True  # False: an agent that ignores "reply" (older than the plugin)
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
                if isinstance(answer, bytes):
                    payload = answer
                elif request.get("reply") == "cni" and self.renders:
                    # what the real agent does for the native plugin (netd.agent.server)
                    status, out = render_reply(answer, request_version(request.get("config")))
                    payload = f"{status}\n{out}".encode()
                else:
                    payload = json.dumps(answer).encode() + b"\n"
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
# (no site-packages, as 'netd install-cni --no-native' installs it), the console
# script, and the native fast path 'netd install-cni' builds with cc.
LAUNCHERS: dict[str, list[str]] = {
    "shim.py": [PYTHON, "-I", "-S", str(SHIM)],
    "console-script": [str(VENV_BIN / "netd-cni")],
    "native": [],  # built on first use: native_plugin()
}


@functools.cache
def native_plugin() -> Path:
    """The native plugin, built once per run as install-cni builds it (netd-cni, netd-ipam)."""
    if cni_native.find_cc() is None and os.geteuid() == 0:
        subprocess.run([str(REPO / "scripts" / "install-deps"), "gcc", "libc6-dev"],
                       capture_output=True, timeout=600, check=False)
    cc = cni_native.find_cc()
    require(cc is not None, "no C compiler (cc) to build the native netd-cni")
    assert cc is not None
    source = SHIM.read_text()
    magic, code = precompile_shim(source, PYTHON)
    program = cni_native.build_native(PYTHON, plugin_code(source, PYTHON, magic, code,
                                                   name_in_argv1=True), cc)
    where = Path(tempfile.mkdtemp(prefix="netd-native-", dir="/tmp"))
    atexit.register(shutil.rmtree, where, True)
    for name in ("netd-cni", "netd-ipam"):
        (where / name).write_bytes(program)
        (where / name).chmod(0o755)
    return where


def launcher(name: str) -> list[str]:
    return [str(native_plugin() / "netd-cni")] if name == "native" else LAUNCHERS[name]


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


@pytest.mark.parametrize("launcher_name", LAUNCHERS)
@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_version(launcher_name: str, version: str) -> None:
    code, out, err = run(launcher(launcher_name), "VERSION", json.dumps({"cniVersion": version}))
    assert code == 0, err
    assert json.loads(out) == {"cniVersion": version, "supportedVersions": SUPPORTED}
    assert err == ""


@pytest.mark.parametrize("stdin", [b"", b"{}", b"not json", b"[]", b'{"cniVersion": 3}'])
def test_version_without_a_usable_request_version(stdin: bytes) -> None:
    code, out, _ = run(LAUNCHERS["shim.py"], "VERSION", stdin)
    assert code == 0
    assert json.loads(out) == {"cniVersion": "1.1.0", "supportedVersions": SUPPORTED}


@pytest.mark.parametrize("launcher_name", LAUNCHERS)
@pytest.mark.parametrize("stdin", [b"", b"{", b"not json", b"[1, 2]", b'"x"',
                                   b'{"a": 1} trailing', b"\xff\xfe{}"])
def test_undecodable_stdin_is_code_6(launcher_name: str, stdin: bytes, agent: Any) -> None:
    fake = agent({"result": {}})
    code, out, _ = run(launcher(launcher_name), "ADD", stdin, **ATTACH)
    assert code == 1
    doc = json.loads(out)
    assert doc["code"] == 6
    assert doc["cniVersion"] == "1.1.0"
    assert doc["msg"] and "details" in doc
    assert fake.requests == []


@pytest.mark.parametrize("launcher_name", LAUNCHERS)
@pytest.mark.parametrize("command", [None, "", "add", "FOO"])
def test_bad_cni_command_is_code_4(launcher_name: str, command: str | None) -> None:
    code, out, _ = run(launcher(launcher_name), command, netconf("/nonexistent.sock"))
    assert code == 1
    doc = json.loads(out)
    assert doc["code"] == 4
    assert "CNI_COMMAND" in doc["msg"]
    assert set(doc) == {"cniVersion", "code", "msg", "details"}


def test_one_table_of_codes_and_one_limit_for_both_fronts() -> None:
    """The shim's codes are the protocol's; the native front's come from the shim's."""
    from netd.cni import protocol as cni
    assert (shim.ERR_INVALID_ENV, shim.ERR_IO, shim.ERR_DECODE, shim.ERR_INVALID_CONFIG,
            shim.ERR_TRY_AGAIN_LATER, shim.ERR_NOT_AVAILABLE, shim.ERR_INTERNAL) == (
        cni.INVALID_ENVIRONMENT, cni.IO_FAILURE, cni.DECODING_FAILURE, cni.INVALID_CONFIG,
        cni.TRY_AGAIN_LATER, cni.PLUGIN_NOT_AVAILABLE, cni.INTERNAL)
    header = cni_native.c_config(PYTHON, "pass\n")
    for name in ("ERR_INTERNAL", "ERR_TRY_AGAIN_LATER", "MAX_CONFIG"):
        assert f"#define {name} {getattr(shim, name)}\n" in header
    source = (REPO / "cni" / "netd-cni.c").read_text()
    printed = re.findall(r'code\\":([^,]*),', source)
    assert printed and set(printed) == {"%d"}  # no code of its own: all from the header


@pytest.mark.parametrize("launcher_name", LAUNCHERS)
def test_a_config_over_4_mib_is_code_7_and_not_sent(launcher_name: str, agent: Any) -> None:
    """Permanent (7), not "try again later" (11): a runtime must not retry it."""
    fake = agent({"result": RESULT})
    big = netconf(fake.path, pad="x" * shim.MAX_CONFIG)
    code, out, _ = run(launcher(launcher_name), "ADD", big, **ATTACH)
    doc = json.loads(out)
    assert (code, doc["code"]) == (1, 7) and "larger than 4194304 bytes" in doc["msg"]
    assert fake.requests == []
    fits = netconf(fake.path, pad="x" * (shim.MAX_CONFIG - 1000))
    assert run(launcher(launcher_name), "ADD", fits, **ATTACH)[0] == 0
    assert len(fake.requests) == 1


def test_invalid_agent_socket_is_code_7() -> None:
    code, out, _ = run(LAUNCHERS["shim.py"], "ADD", netconf("/x", agentSocket=5), **ATTACH)
    assert code == 1
    assert json.loads(out)["code"] == 7


# --- forwarding -----------------------------------------------------------------------


@pytest.mark.parametrize("launcher_name", LAUNCHERS)
def test_add_is_forwarded_and_the_result_printed(launcher_name: str, agent: Any) -> None:
    fake = agent({"result": RESULT})
    stdin = netconf(fake.path, runtimeConfig={"ips": ["198.18.0.10/24"]}, dns={"domain": "é"})
    code, out, err = run(launcher(launcher_name), "ADD", stdin, **ATTACH, CNI_OTHER="x")
    assert (code, err) == (0, "")
    assert json.loads(out) == RESULT
    assert out.endswith("\n")
    sent = {k: v for k, v in fake.requests[0].items() if k != "reply"}
    assert sent == {"plugin": "netd-cni", "command": "ADD", "env": ATTACH,
                    "config": json.loads(stdin)}
    assert len(fake.requests) == 1


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


@pytest.mark.parametrize("launcher_name", LAUNCHERS)
def test_agent_error_is_printed_with_cni_version(launcher_name: str, agent: Any) -> None:
    fake = agent({"error": {"code": 101, "msg": "pool 'rack9' not found",
                            "details": "create it with netctl pool create"}})
    code, out, _ = run(launcher(launcher_name), "ADD", netconf(fake.path, "0.4.0"), **ATTACH)
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


@pytest.mark.parametrize("launcher_name", LAUNCHERS)
@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC"])
def test_agent_missing_is_try_again_later(launcher_name: str, command: str, sockdir: Path) -> None:
    path = sockdir / "none.sock"
    code, out, _ = run(launcher(launcher_name), command, netconf(path, "1.1.0"), **ATTACH)
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
        with pytest.raises(ValueError):
            plugin_launcher(source, bad, "a70d0d0a", "AAAA")
    with pytest.raises(ValueError):
        plugin_launcher(source, "/usr/bin/python3", "", "AAAA")
    with pytest.raises(ValueError):
        plugin_launcher(source, "/usr/bin/python3", "a70d0d0a", 'x"; import os #')


def test_plugin_launcher_runs_the_precompiled_code_else_the_source(sockdir: Path,
                                                                   agent: Any) -> None:
    """The installed file carries the shim compiled by its python, and the source for others."""
    source = SHIM.read_text()
    magic, code = precompile_shim(source, PYTHON)
    text = plugin_launcher(source, PYTHON, magic, code, "netd-cni")
    assert text.startswith(f"#!{PYTHON} -IS\n")
    assert base64.b64encode(source.encode()).decode() in text
    fake = agent({"result": RESULT})
    # the same interpreter loads the code; another magic number (another python) compiles
    for variant in (text, text.replace(f'MAGIC = "{magic}"', 'MAGIC = "00000000"')):
        path = sockdir / "netd-cni"
        path.write_text(variant)
        path.chmod(0o755)
        code_, out, err = run([str(path)], "ADD", netconf(fake.path), **ATTACH)
        assert (code_, json.loads(out), err) == (0, RESULT, "")
        assert run([str(path)], "VERSION", '{"cniVersion": "0.4.0"}')[0] == 0
    assert len(fake.requests) == 2
    # deterministic: the same interpreter compiles the same bytes (install-cni is idempotent)
    assert precompile_shim(source, PYTHON) == (magic, code)
    with pytest.raises(ValueError, match="cannot compile"):
        precompile_shim("def broken(:\n", PYTHON)


@pytest.mark.parametrize("command", ["VERSION", "ADD"])
def test_installed_plugin_imports_nothing_heavy(command: str, sockdir: Path) -> None:
    """Loading the precompiled shim adds no module the source shim does not load."""
    source = SHIM.read_text()
    path = sockdir / "netd-cni"
    path.write_text(plugin_launcher(source, PYTHON, *precompile_shim(source, PYTHON)))
    proc = subprocess.run([PYTHON, "-I", "-S", "-X", "importtime", str(path)],
                          input=netconf(sockdir / "none.sock").encode(), capture_output=True,
                          timeout=30, env={"CNI_COMMAND": command, **ATTACH})
    assert proc.returncode == (0 if command == "VERSION" else 1)
    imported = {line.rpartition("|")[2].strip() for line in proc.stderr.decode().splitlines()
                if line.startswith("import time:")}
    assert "_json" in imported
    assert not imported & {"json", "socket", "re", "enum", "netd", "typing", "os",
                           "collections", "importlib", "importlib.util"}, imported


def test_install_cni_makes_working_plugins(sockdir: Path, agent: Any) -> None:
    """--no-native: the Python plugin alone, one self-contained file per plugin."""
    netd = str(VENV_BIN / "netd")
    bin_dir = sockdir / "bin"
    proc = subprocess.run([netd, "install-cni", "--no-native", "--bin-dir", str(bin_dir)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"installed {bin_dir / 'netd-cni'}" in proc.stdout
    assert f"installed {bin_dir / 'netd-ipam'}" in proc.stdout
    assert sorted(p.name for p in bin_dir.iterdir()) == ["netd-cni", "netd-ipam"]
    source = SHIM.read_text()
    magic, code = precompile_shim(source, PYTHON)
    for name in ("netd-cni", "netd-ipam"):
        path = bin_dir / name
        assert path.stat().st_mode & 0o777 == 0o755
        assert path.read_text() == plugin_launcher(source, PYTHON, magic, code, name)
        code_, out, err = run([str(path)], "VERSION", '{"cniVersion": "0.4.0"}')
        assert (code_, err) == (0, "")
        assert json.loads(out)["supportedVersions"] == SUPPORTED

    fake = agent({"result": RESULT})
    code_, out, _ = run([str(bin_dir / "netd-cni")], "ADD", netconf(fake.path), **ATTACH)
    assert (code_, json.loads(out)) == (0, RESULT)
    ipam_conf = json.dumps({"cniVersion": "1.0.0", "name": "br", "type": "bridge",
                            "ipam": {"type": "netd-ipam", "pool": "p",
                                     "agentSocket": str(fake.path)}})
    code_, out, _ = run([str(bin_dir / "netd-ipam")], "DEL", ipam_conf, **ATTACH)
    assert (code_, json.loads(out)) == (0, RESULT)
    assert [r["plugin"] for r in fake.requests] == ["netd-cni", "netd-ipam"]

    # idempotent: nothing rewritten, nothing left behind
    inode = (bin_dir / "netd-cni").stat().st_ino
    again = subprocess.run([netd, "install-cni", "--no-native", "--bin-dir", str(bin_dir)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0
    assert again.stdout.count("up to date") == 2
    assert (bin_dir / "netd-cni").stat().st_ino == inode
    # a changed or damaged file is replaced atomically (new inode)
    (bin_dir / "netd-ipam").write_text("#!/bin/sh\nexit 1\n")
    third = subprocess.run([netd, "install-cni", "--no-native", "--bin-dir", str(bin_dir)],
                           capture_output=True, text=True, timeout=60)
    assert third.returncode == 0
    assert f"installed {bin_dir / 'netd-ipam'}" in third.stdout
    assert sorted(p.name for p in bin_dir.iterdir()) == ["netd-cni", "netd-ipam"]
    assert run([str(bin_dir / "netd-ipam")], "VERSION")[0] == 0


def test_install_cni_builds_the_native_plugin(sockdir: Path, agent: Any) -> None:
    native_plugin()  # a C compiler is there (or the test stops here)
    netd = str(VENV_BIN / "netd")
    bin_dir = sockdir / "bin"
    proc = subprocess.run([netd, "install-cni", "--bin-dir", str(bin_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"installed {bin_dir / 'netd-cni'} (native, python fallback {PYTHON})" in proc.stdout
    assert sorted(p.name for p in bin_dir.iterdir()) == ["netd-cni", "netd-ipam"]
    program = (bin_dir / "netd-cni").read_bytes()
    assert program[:4] == b"\x7fELF" and (bin_dir / "netd-ipam").read_bytes() == program
    assert program == (native_plugin() / "netd-cni").read_bytes()  # deterministic
    fake = agent({"result": RESULT})
    code_, out, _ = run([str(bin_dir / "netd-cni")], "ADD", netconf(fake.path), **ATTACH)
    assert (code_, json.loads(out)) == (0, RESULT)
    assert run([str(bin_dir / "netd-ipam")], "VERSION")[0] == 0
    again = subprocess.run([netd, "install-cni", "--bin-dir", str(bin_dir)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("up to date") == 2


def test_native_plugin_forwards_plain_configs_itself(agent: Any, sockdir: Path) -> None:
    """It sends the shim's request (plus reply=cni) and prints what the agent rendered;
    anything unusual goes through the Python plugin, with the same output."""
    native = launcher("native")
    fake = agent({"result": RESULT})
    pretty = json.dumps(json.loads(netconf(fake.path, runtimeConfig={"mac": "02:00:00:00:00:01"},
                                           args={"x": [1, 2.5e3, None, True]})), indent=2)
    code, out, err = run(native, "ADD", pretty, **ATTACH)
    assert (code, json.loads(out), err) == (0, RESULT, "")
    assert fake.requests[-1] == {"plugin": "netd-cni", "command": "ADD", "reply": "cni",
                                 "env": ATTACH, "config": json.loads(pretty)}
    # not plain ASCII JSON, an escaped socket path: the Python plugin, same answers
    for stdin in (netconf(fake.path, dns={"domain": "é"}).replace("\\u00e9", "é"),
                  netconf(fake.path).replace("/", "\\/")):
        before = len(fake.requests)
        code, out, _ = run(native, "ADD", stdin, **ATTACH)
        assert (code, json.loads(out)) == (0, RESULT)
        assert len(fake.requests) == before + 1 and "reply" not in fake.requests[-1]
    # the Python plugin and the native one print the same bytes
    for answer in ({"result": RESULT}, {"result": {}}, {"error": {"code": 7, "msg": "bad"}},
                   {"error": {"msg": "no code"}}, {"neither": 1}):
        fake.answer = answer
        assert run(native, "DEL", netconf(fake.path, "0.4.0"), **ATTACH) == run(
            LAUNCHERS["shim.py"], "DEL", netconf(fake.path, "0.4.0"), **ATTACH), answer
    # an agent that does not render (older than the plugin): handed to python, same output
    fake.answer, fake.renders = {"result": RESULT}, False
    before = len(fake.requests)
    code, out, _ = run(native, "ADD", netconf(fake.path), **ATTACH)
    assert (code, json.loads(out)) == (0, RESULT)
    assert len(fake.requests) == before + 2  # asked once natively, once by python


def test_native_ipam_plugin_and_broken_agents(agent: Any, sockdir: Path) -> None:
    ipam_plugin = [str(native_plugin() / "netd-ipam")]
    fake = agent({"result": {"ips": [{"address": "198.18.0.10/24"}]}})
    config = json.dumps({"cniVersion": "0.4.0", "name": "br", "type": "bridge",
                         "agentSocket": "/not/this/one.sock",
                         "ipam": {"type": "netd-ipam", "pool": "rack1",
                                  "agentSocket": str(fake.path)}})
    code, out, _ = run(ipam_plugin, "ADD", config, **ATTACH)
    assert (code, json.loads(out)["cniVersion"]) == (0, "0.4.0")
    assert fake.requests[-1]["plugin"] == "netd-ipam" and fake.requests[-1]["reply"] == "cni"

    # an agent that reads the request and hangs up: try again later, with the request's version
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
        code, out, _ = run(launcher("native"), "DEL", netconf(rude, "0.3.1"), **ATTACH)
    finally:
        t.join(5)
        srv.close()
    assert code == 1
    assert json.loads(out) == {
        "cniVersion": "0.3.1", "code": 11,
        "msg": f"try again later: netd agent not reachable at {rude}: "
               "connection closed without an answer",
        "details": "the netd host agent ('netd agent') serves this socket"}


def test_native_plugin_without_its_python() -> None:
    cc = cni_native.find_cc()
    native_plugin()
    assert cc is not None
    program = cni_native.build_native("/nonexistent/python3", "pass\n", cc)
    where = Path(tempfile.mkdtemp(prefix="netd-native-", dir="/tmp"))
    try:
        (where / "netd-cni").write_bytes(program)
        (where / "netd-cni").chmod(0o755)
        code, out, _ = run([str(where / "netd-cni")], "VERSION", "{}")
    finally:
        shutil.rmtree(where, ignore_errors=True)
    doc = json.loads(out)
    assert (code, doc["code"]) == (1, 100)
    assert "cannot run /nonexistent/python3" in doc["msg"]


@pytest.mark.parametrize("answer", [
    {"result": RESULT}, {"result": {}}, {"result": {"ips": []}},
    {"error": {"code": 101, "msg": "pool 'x' not found", "details": "d"}},
    {"error": {"code": True, "msg": ""}}, {"error": {"code": 3}}, {"neither": 1},
    {"result": [1]}, {"result": {"cniVersion": "0.3.1", "x": "é\u2028"}},
])
def test_agent_rendering_matches_the_shim(answer: dict[str, Any]) -> None:
    for version in ("0.3.1", "1.1.0"):
        line = json.dumps(answer).encode()
        assert render_reply(answer, version) == shim.render_answer(line, version)
    assert request_version({"cniVersion": ""}) == request_version(None) == "1.1.0"
    assert request_version({"cniVersion": "0.4.0"}) == "0.4.0"


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

    source = SHIM.read_text()
    installed = Path(tempfile.mkdtemp(prefix="netd-shim-", dir="/tmp")) / "netd-cni"
    try:
        installed.write_text(plugin_launcher(source, PYTHON, *precompile_shim(source, PYTHON)))
        installed.chmod(0o755)
        bare = median_ms([PYTHON, "-I", "-S", "-c", "pass"])
        plugin = median_ms([PYTHON, "-I", "-S", str(SHIM)])
        precompiled = median_ms([str(installed)])
        console = median_ms([str(VENV_BIN / "netd-cni")])
    finally:
        shutil.rmtree(installed.parent, ignore_errors=True)
    with capsys.disabled():
        print(f"\n[exec time, VERSION, median of 20] installed (precompiled): "
              f"{precompiled:.1f} ms; "
              f"python -IS shim.py: {plugin:.1f} ms; bare interpreter: {bare:.1f} ms; "
              f"console script netd-cni: {console:.1f} ms")
