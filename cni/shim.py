#!/usr/bin/env python3
"""netd-cni / netd-ipam: the CNI plugin, a thin shim in front of the netd host agent.

This one file is the whole plugin. ``netd install-cni`` installs it into a CNI
bin directory twice, as ``netd-cni`` (main plugin) and ``netd-ipam`` (IPAM
plugin): precompiled by the ``python3`` that runs it (``#!/path/to/python3
-IS``), behind the native fast path when a C compiler builds one
(:mod:`netd.cli.cni_native`: it forwards plain ADD/DEL/... requests itself and
hands everything else to this code). The name it runs under decides the
plugin kind. It answers VERSION itself and forwards every
other command to the agent's unix socket (``agentSocket`` in the network
config, default ``/run/netd/agent.sock``), one JSON request per connection::

    {"plugin": "netd-cni", "command": "ADD", "env": {"CNI_CONTAINERID": ...},
     "config": {...network config from stdin...}}

and prints the agent's answer the CNI way: ``{"result": R}`` prints R (nothing
when R is empty) and exits 0; ``{"error": E}`` prints E with ``cniVersion`` and
exits 1. See docs/AGENT.md.

A runtime execs the plugin for every ADD and DEL, so start-up time counts:
standard library only, nothing imported that forwarding does not need, and
not even ``json``, ``socket`` or ``os`` when CPython's C halves of them
(``_json``, ``_socket``, ``posix``) are there. Those pull in ``re`` and
``enum``, which would double the time the interpreter needs to start. When the
C modules are missing, the shim falls back to the ordinary modules.
"""

import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # never at run time: typing and collections.abc cost imports
    from collections.abc import Callable

LATEST_VERSION = "1.1.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
PLUGINS = ("netd-cni", "netd-ipam")
FORWARDED_COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC")
ENV_KEYS = ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
DEFAULT_AGENT_SOCKET = "/run/netd/agent.sock"
ADD_TIMEOUT = 120.0  # seconds for the whole exchange with the agent
OTHER_TIMEOUT = 30.0
MAX_ANSWER = 64 * 1024 * 1024
MAX_CONFIG = 4 * 1024 * 1024  # a network config larger than this is refused (7), not sent

# The error codes both fronts (this shim, the native one: cni/netd-cni.c) use;
# netd.cni.protocol has the same table (tests/unit/test_cni_shim.py holds them together).
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_NOT_AVAILABLE = 50  # STATUS: the plugin cannot serve ADDs
ERR_INTERNAL = 100

# --- JSON ------------------------------------------------------------------------


try:
    import _json

    class _ScanContext:
        strict = True
        object_hook = None
        object_pairs_hook = None
        array_hook = None
        parse_float = float
        parse_int = int
        parse_constant = {"NaN": float("nan"), "Infinity": float("inf"),
                          "-Infinity": float("-inf")}.__getitem__

    def _no_default(obj: object) -> object:
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    _scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]
    _encode = _json.make_encoder(None, _no_default, _json.encode_basestring_ascii, None,
                                 ":", ",", False, False, True)

    def json_loads(text: str) -> object:
        """``json.loads`` for a str, on the C scanner alone.

        Bad input goes to the real ``json`` (its error messages need
        ``json.decoder`` loaded): costly, but only on the error path.
        """
        ws = " \t\n\r"
        start = len(text) - len(text.lstrip(ws))
        try:
            value, end = _scan(text, start)
        except Exception:  # StopIteration, or the scanner's own errors
            value, end = None, -1
        if end < 0 or text[end:].strip(ws):
            import json

            return json.loads(text)
        return value

    def json_dumps(obj: object) -> str:
        """Compact ``json.dumps`` (ASCII, no newlines), on the C encoder alone."""
        return "".join(_encode(obj, 0))

    if json_loads(json_dumps({"a": [1, 2.5, None, True, "\u00e9"]})) != {
            "a": [1, 2.5, None, True, "\u00e9"]}:
        raise ImportError("the _json C codec does not behave as expected")
except Exception:  # pragma: no cover - not CPython, or its _json changed

    def json_loads(text: str) -> object:
        import json

        return json.loads(text)

    def json_dumps(obj: object) -> str:
        import json

        return json.dumps(obj, separators=(",", ":"))


# --- environment -----------------------------------------------------------------


def read_environ() -> dict[str, str]:
    """The CNI_* variables of this process."""
    names = ("CNI_COMMAND", *ENV_KEYS)
    try:
        from posix import environ as benv  # bytes -> bytes; 'os' costs another import
    except ImportError:  # pragma: no cover - not POSIX
        from os import environ

        return {k: environ[k] for k in names if k in environ}
    out = {}
    for name in names:
        value = benv.get(name.encode())
        if value is not None:
            out[name] = value.decode("utf-8", "surrogateescape")
    return out


def plugin_from_argv0(argv0: str) -> str:
    """``netd-ipam`` when run under that name, else ``netd-cni``."""
    base = argv0.replace("\\", "/").rpartition("/")[2]
    return "netd-ipam" if base.startswith("netd-ipam") else "netd-cni"


# --- answers -----------------------------------------------------------------------


def error_doc(cni_version: str, code: int, msg: str, details: str = "") -> str:
    return json_dumps({"cniVersion": cni_version, "code": code, "msg": msg,
                       "details": details}) + "\n"


def version_answer(stdin: bytes) -> str:
    """VERSION: the request's cniVersion (or the latest) and what we support.

    Lenient on purpose: VERSION needs no config, so an empty or unreadable
    stdin still gets an answer.
    """
    version = LATEST_VERSION
    try:
        doc = json_loads(stdin.decode("utf-8"))
    except Exception:
        doc = None
    if isinstance(doc, dict):
        requested = doc.get("cniVersion")
        if isinstance(requested, str) and requested:
            version = requested
    return json_dumps({"cniVersion": version,
                       "supportedVersions": list(SUPPORTED_VERSIONS)}) + "\n"


def agent_socket_of(plugin: str, config: dict[str, object]) -> object:
    """``agentSocket`` of the config (in ``ipam`` for netd-ipam); None when unset."""
    if plugin == "netd-ipam":
        ipam = config.get("ipam")
        return ipam.get("agentSocket") if isinstance(ipam, dict) else None
    return config.get("agentSocket")


class AgentUnreachable(Exception):
    pass


class AgentRefused(Exception):
    """The socket is not ours to use (permission denied): permanent, not "try later"."""


def exchange(path: str, payload: bytes, timeout: float) -> bytes:
    """Send one request line to the agent, return its answer line."""
    try:
        import _socket as socket_mod
    except ImportError:  # pragma: no cover - not CPython
        import socket as socket_mod  # type: ignore[no-redef]
    deadline = time.monotonic() + timeout
    try:
        sock = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    except OSError as exc:
        raise AgentUnreachable(f"cannot create a socket: {exc.strerror or exc}") from None
    try:
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except TimeoutError:
            raise AgentUnreachable(f"no connection within {timeout:g} s") from None
        except PermissionError as exc:
            raise AgentRefused(exc.strerror or str(exc)) from None
        except OSError as exc:
            raise AgentUnreachable(exc.strerror or str(exc)) from None
        chunks: list[bytes] = []
        size = 0
        try:
            sock.sendall(payload)
            sock.shutdown(socket_mod.SHUT_WR)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if b"\n" in chunk or size > MAX_ANSWER:
                    break
        except TimeoutError:
            raise AgentUnreachable(f"no answer within {timeout:g} s") from None
        except OSError as exc:
            raise AgentUnreachable(f"connection failed: {exc.strerror or exc}") from None
        answer = b"".join(chunks).partition(b"\n")[0]
        if not answer.strip():
            raise AgentUnreachable("connection closed without an answer")
        return answer
    finally:
        sock.close()


def render_answer(answer: bytes, cni_version: str) -> tuple[int, str]:
    """The agent's answer line -> (exit code, stdout)."""
    try:
        doc = json_loads(answer.decode("utf-8"))
    except Exception as exc:
        return 1, error_doc(cni_version, ERR_IO, "invalid answer from the netd agent",
                            f"cannot decode it: {exc}")
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        err = doc["error"]
        code = err.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            code = ERR_INTERNAL
        msg = err.get("msg")
        details = err.get("details")
        return 1, error_doc(cni_version, code,
                            msg if isinstance(msg, str) and msg else "netd agent error",
                            details if isinstance(details, str) else "")
    if isinstance(doc, dict) and isinstance(doc.get("result"), dict):
        result = doc["result"]
        if not result:
            return 0, ""
        if "cniVersion" not in result:
            result = {"cniVersion": cni_version, **result}
        return 0, json_dumps(result) + "\n"
    return 1, error_doc(cni_version, ERR_IO, "invalid answer from the netd agent",
                        "expected an object with 'result' or 'error'")


# --- the plugin ---------------------------------------------------------------------


def handle(plugin: str, env: dict[str, str],
           read_stdin: "Callable[[], bytes]") -> tuple[int, str]:
    """One plugin run: (exit code, text for stdout). Never raises for bad input.

    ``read_stdin`` is a callable returning the stdin bytes; it is called only
    when the command needs stdin.
    """
    command = env.get("CNI_COMMAND", "")
    if command == "VERSION":
        return 0, version_answer(read_stdin())
    if not command:
        return 1, error_doc(LATEST_VERSION, ERR_INVALID_ENV,
                            "required env variables [CNI_COMMAND] missing")
    if command not in FORWARDED_COMMANDS:
        return 1, error_doc(LATEST_VERSION, ERR_INVALID_ENV,
                            f"unknown CNI_COMMAND: {command}",
                            "expected one of ADD, DEL, CHECK, STATUS, GC, VERSION")

    raw = read_stdin()
    if len(raw) > MAX_CONFIG:
        return 1, error_doc(LATEST_VERSION, ERR_INVALID_CONFIG,
                            f"invalid network config: larger than {MAX_CONFIG} bytes",
                            f"got {len(raw)} bytes on stdin")
    try:
        config = json_loads(raw.decode("utf-8"))
    except Exception as exc:
        why = "stdin is empty" if not raw.strip() else str(exc)
        return 1, error_doc(LATEST_VERSION, ERR_DECODE,
                            "cannot decode the network config on stdin", why)
    if not isinstance(config, dict):
        return 1, error_doc(LATEST_VERSION, ERR_DECODE,
                            "cannot decode the network config on stdin",
                            f"expected a JSON object, got {type(config).__name__}")
    version = config.get("cniVersion")
    cni_version = version if isinstance(version, str) and version else LATEST_VERSION

    path = agent_socket_of(plugin, config)
    if path is None:
        path = DEFAULT_AGENT_SOCKET
    where = "ipam.agentSocket" if plugin == "netd-ipam" else "agentSocket"
    if not isinstance(path, str) or not path or "\0" in path:
        return 1, error_doc(cni_version, ERR_INVALID_CONFIG,
                            f"invalid network config: {where} must be a socket path")

    request = {"plugin": plugin, "command": command,
               "env": {k: env[k] for k in ENV_KEYS if k in env}, "config": config}
    try:
        payload = (json_dumps(request) + "\n").encode("ascii")
    except Exception as exc:
        return 1, error_doc(cni_version, ERR_DECODE,
                            "cannot decode the network config on stdin", str(exc))
    timeout = ADD_TIMEOUT if command == "ADD" else OTHER_TIMEOUT
    try:
        answer = exchange(path, payload, timeout)
    except AgentRefused as exc:
        return 1, error_doc(cni_version, ERR_IO, f"permission denied by the netd agent's "
                            f"socket {path}: {exc}",
                            "the socket is root's only: run the runtime as root")
    except AgentUnreachable as exc:
        if command == "STATUS":
            return 1, error_doc(cni_version, ERR_NOT_AVAILABLE,
                                f"netd agent not reachable at {path}: {exc}",
                                "the netd host agent ('netd agent') serves this socket")
        return 1, error_doc(cni_version, ERR_TRY_AGAIN_LATER,
                            f"try again later: netd agent not reachable at {path}: {exc}",
                            "the netd host agent ('netd agent') serves this socket")
    return render_answer(answer, cni_version)


def _read_stdin() -> bytes:
    stdin = sys.stdin
    if stdin is None:
        return b""
    if stdin.isatty():  # a person typing 'netd-cni' by hand: do not wait
        return b""
    return stdin.buffer.read(MAX_CONFIG + 1)  # more is refused anyway: never read GBs


def main(plugin: str | None = None) -> int:
    """Run as a CNI plugin; ``plugin`` overrides the kind taken from argv[0]."""
    if plugin is None:
        plugin = plugin_from_argv0(sys.argv[0] if sys.argv else "")
    if plugin not in PLUGINS:
        plugin = "netd-cni"
    try:
        code, out = handle(plugin, read_environ(), _read_stdin)
    except Exception as exc:  # a bug here must still answer the CNI way
        code, out = 1, error_doc(LATEST_VERSION, ERR_INTERNAL,
                                 f"{plugin} failed: {type(exc).__name__}: {exc}")
    if out:
        try:
            sys.stdout.write(out)
            sys.stdout.flush()
        except OSError:
            return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
