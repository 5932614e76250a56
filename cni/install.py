"""``netd install-cni``: put ``netd-cni`` and ``netd-ipam`` into a CNI bin directory.

Each plugin is one self-contained file (the name it is installed under decides
its kind). A runtime execs it for every ADD and DEL, so it is built to start
fast:

* the Python plugin is :mod:`.shim` (standard library only), with a
  ``#!PYTHON -IS`` line, precompiled by that interpreter (marshalled code, and
  its source for any other Python version): an exec neither compiles ~350
  lines nor loads netd or site-packages;
* with a C compiler, the file is instead the native front
  (``cni/netd-cni.c``, compiled here): it forwards plain requests to the
  agent without starting an interpreter and hands everything else to the
  Python plugin embedded in it (``python -IS -c``).

Everything here but :func:`install` is pure or runs only the compiler and the
plugins' interpreter, with argument lists.
"""

from __future__ import annotations

import base64
import importlib.resources
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from netd.files import atomic_write

from . import shim

PLUGINS = ("netd-cni", "netd-ipam")
DEFAULT_BIN_DIR = "/opt/cni/bin"
SYSTEM_PYTHON = "/usr/bin/python3"
SHEBANG_MAX = 250  # the kernel reads at most 256 bytes of a '#!' line
C_SOURCE = "netd-cni.c"
C_CONFIG = "netd-cni-config.h"


class InstallError(Exception):
    """The plugins cannot be built or written; the message says why."""


def shebang(python: str) -> str:
    """``#!PYTHON -IS``, checked (pure).

    ``-I`` (isolated: no user site, no PYTHON* variables) and ``-S`` (no
    site-packages) keep each exec fast and independent of the environment.
    They go together as ``-IS``: Linux hands everything after the interpreter
    on a '#!' line to it as ONE argument, and Python rejects ``"-I -S"``.
    """
    if not python.startswith("/"):
        raise ValueError(f"python must be an absolute path, not {python!r}")
    if any(c.isspace() for c in python):
        raise ValueError(f"python path {python!r} contains whitespace; a '#!' line cannot hold it")
    line = f"#!{python} -IS\n"
    if len(line) > SHEBANG_MAX:
        raise ValueError(f"python path {python!r} is too long for a '#!' line")
    return line


def plugin_script(shim_source: str, python: str) -> str:
    """The shim's source with ``#!PYTHON -IS`` as its first line (pure)."""
    body = shim_source.split("\n", 1)[1] if shim_source.startswith("#!") else shim_source
    return shebang(python) + body


# Run by the plugins' interpreter at install time: the shim compiled by it, and the
# magic number that says which interpreters can load that code.
_PRECOMPILE = (
    "import binascii, marshal, sys\n"
    "from importlib.util import MAGIC_NUMBER\n"
    "code = compile(sys.stdin.buffer.read(), sys.argv[1], 'exec', dont_inherit=True)\n"
    "sys.stdout.write(MAGIC_NUMBER.hex() + ' '"
    " + binascii.b2a_base64(marshal.dumps(code), newline=False).decode('ascii'))\n"
)

_LAUNCHER = """\
# {name}: the netd CNI plugin (netd.cni.shim), installed by 'netd install-cni'.
# Below: the plugin's code as compiled by {python} (it loads in a fraction of a
# millisecond; compiling the source costs ~3 ms, on every exec), and its source,
# compiled only by an interpreter that cannot load that code (another version).
from binascii import a2b_base64 as _b64


def _run():
    try:
        from _frozen_importlib_external import MAGIC_NUMBER
    except ImportError:  # not CPython
        MAGIC_NUMBER = b""
    if MAGIC_NUMBER.hex() == MAGIC:
        import marshal

        code = marshal.loads(_b64(CODE))
    else:
        code = compile(_b64(SOURCE), "{name}", "exec", dont_inherit=True)
    {argv}exec(code, {{"__name__": "__main__"}})


MAGIC = "{magic}"
CODE = "{code}"
SOURCE = "{source}"
_run()
"""

# run as 'python -IS -c CODE NAME' (by the native plugin): the shim reads its kind from argv[0]
_ARGV_FROM_ARG = "import sys\n\n    sys.argv[:2] = sys.argv[1:2]\n    "


def plugin_code(shim_source: str, python: str, magic: str, code: str,
                name: str = "netd-cni", *, name_in_argv1: bool = False) -> str:
    """The Python plugin without its '#!' line: the shim precompiled, and its source (pure).

    ``magic`` and ``code`` are what :func:`precompile_shim` returns for
    ``python``: the plugin runs that code when the interpreter's bytecode magic
    number matches, else it compiles the embedded source (a python upgraded
    under the plugin keeps working, ~3 ms slower per exec until the next
    ``netd install-cni``). Standard library only. ``name_in_argv1``: the code
    is run by ``python -IS -c CODE NAME`` (the native plugin's fallback).
    """
    if not magic or not all(c in "0123456789abcdef" for c in magic):
        raise ValueError(f"bad magic number {magic!r}")
    if not code or not all(c.isalnum() or c in "+/=" for c in code):
        raise ValueError("the compiled code must be base64")
    source = base64.b64encode(shim_source.encode("utf-8")).decode("ascii")
    return _LAUNCHER.format(name=name, python=python, magic=magic, code=code, source=source,
                            argv=_ARGV_FROM_ARG if name_in_argv1 else "")


def plugin_launcher(shim_source: str, python: str, magic: str, code: str,
                    name: str = "netd-cni") -> str:
    """The installed Python plugin: ``#!PYTHON -IS`` and :func:`plugin_code` (pure).

    One self-contained file: no hidden module next to it, nothing compiled at
    run time (unless another python runs it).
    """
    return shebang(python) + plugin_code(shim_source, python, magic, code, name)


def precompile_shim(shim_source: str, python: str) -> tuple[str, str]:
    """``(magic number, base64 of the marshalled code)`` of the shim, compiled by ``python``."""
    try:
        proc = subprocess.run([python, "-IS", "-c", _PRECOMPILE, "netd.cni.shim"],
                              input=shim_source.encode("utf-8"), capture_output=True,
                              timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"python {python} cannot compile the plugin: {exc}") from None
    magic, _, code = proc.stdout.decode("ascii", "replace").strip().partition(" ")
    if proc.returncode != 0 or not code:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise ValueError(f"python {python} cannot compile the plugin: "
                         f"{err[-1] if err else 'exit status ' + str(proc.returncode)}")
    return magic, code


def default_plugin_python() -> str:
    """The interpreter that starts fastest: the distribution's python3 when present.

    The shim needs only the standard library, so any CPython >= 3.8 runs it;
    a distribution build starts noticeably faster than a self-built one
    (11 ms against 15 ms here), and every ADD pays that once.
    """
    if os.access(SYSTEM_PYTHON, os.X_OK):
        return SYSTEM_PYTHON
    return os.path.realpath(sys.executable)


def shim_source() -> str:
    spec = importlib.util.find_spec("netd.cni.shim")
    if spec is None or spec.origin is None:
        raise InstallError("netd.cni.shim not found; is netd installed?")
    try:
        return Path(spec.origin).read_text(encoding="utf-8")
    except OSError as exc:
        raise InstallError(f"cannot read the plugin source {spec.origin}: {exc}") from None


# --- the native front -----------------------------------------------------------------


def c_string(text: str) -> str:
    """``text`` as a C string literal (ASCII; one line per source line)."""
    out = []
    for line in text.splitlines(keepends=True):
        escaped = "".join(
            "\\\\" if c == "\\" else '\\"' if c == '"' else "\\n" if c == "\n"
            else c if " " <= c <= "~" else f"\\x{ord(c):02x}\"\"" for c in line)
        out.append(f'"{escaped}"')
    return "\n    ".join(out) if out else '""'


#: the codes the native front prints itself and the config limit, from the shim's table
#: (one table, one limit, both fronts)
NATIVE_CODES = ("ERR_TRY_AGAIN_LATER", "ERR_INTERNAL", "MAX_CONFIG")


def c_config(python: str, fallback_code: str) -> str:
    """``netd-cni-config.h``: the fallback's interpreter and code, and the error codes, as C
    constants (pure)."""
    if not fallback_code.isascii():
        raise ValueError("the fallback code must be ASCII")
    codes = "".join(f"#define {name} {getattr(shim, name)}\n" for name in NATIVE_CODES)
    return ("/* generated by 'netd install-cni' (cni/install.py) */\n" + codes
            + f"static const char PYTHON[] = {c_string(python)};\n"
            f"static const char FALLBACK[] =\n    {c_string(fallback_code)};\n")


def c_source() -> str:
    """The native front's C source, as installed with netd."""
    return importlib.resources.files("netd.cni").joinpath(C_SOURCE).read_text("ascii")


def find_cc() -> str | None:
    """The C compiler (``$CC``, else ``cc``), or None."""
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def build_native(python: str, fallback_code: str, cc: str, static: bool = False) -> bytes:
    """Compile the native front; its bytes (deterministic for the same compiler and input).
    ``static``: linked statically, for a host whose C library is not the builder's (a
    DaemonSet's init container installs onto the node)."""
    with tempfile.TemporaryDirectory(prefix="netd-cni-build-") as tmp:
        src = Path(tmp) / "netd-cni.c"
        exe = Path(tmp) / "netd-cni"
        src.write_text(c_source(), encoding="ascii")
        (Path(tmp) / C_CONFIG).write_text(c_config(python, fallback_code), encoding="ascii")
        try:
            proc = subprocess.run([cc, "-O2", "-s", "-std=gnu11", "-Wall", "-Wextra", "-Werror",
                                   *(["-static"] if static else []), "-o", str(exe), str(src)],
                                  capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ValueError(f"{cc}: {exc}") from None
        if proc.returncode != 0:
            raise ValueError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        return exe.read_bytes()


# --- install ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    path: Path
    changed: bool
    kind: str

    def __str__(self) -> str:
        return f"{'installed' if self.changed else 'up to date'} {self.path} ({self.kind})"


def install(bin_dir: Path, python: str | None = None, *, native: bool = True,
            static: bool = False) -> list[Installed]:
    """Write both plugins into ``bin_dir``, atomically and idempotently."""
    interpreter = python or default_plugin_python()
    if not os.access(interpreter, os.X_OK):
        raise InstallError(f"python {interpreter} is not an executable")
    source = shim_source()
    cc = find_cc() if native else None
    kind = (f"native{', static' if static else ''}, python fallback {interpreter}" if cc
            else f"#!{interpreter} -IS")
    try:
        shebang(interpreter)
        magic, code = precompile_shim(source, interpreter)
        if cc:
            program = build_native(interpreter, plugin_code(
                source, interpreter, magic, code, "netd-cni", name_in_argv1=True), cc, static)
            files = dict.fromkeys(PLUGINS, program)
        else:
            files = {name: plugin_launcher(source, interpreter, magic, code, name).encode()
                     for name in PLUGINS}
    except ValueError as exc:
        raise InstallError(str(exc)) from None
    try:
        bin_dir.mkdir(parents=True, exist_ok=True)
        return [Installed(bin_dir / name, atomic_write(bin_dir / name, files[name], 0o755), kind)
                for name in PLUGINS]
    except OSError as exc:
        raise InstallError(f"cannot install into {bin_dir}: {exc}") from None


# --- the network configuration ---------------------------------------------------------

DEFAULT_CONF_DIR = "/etc/cni/net.d"
CONFLIST_NAME = "10-netd.conflist"
#: what a runtime's libcni reads: containerd 1.6 (go-cni) and CRI-O 1.2x stop at 1.0.0
#: (a 1.1.0 result fails their ADD); podman 4 and containerd 1.7+ read 1.1.0
DEFAULT_CNI_VERSION = "1.0.0"


def conflist(network: str, pool: str, agent_socket: str,
             cni_version: str = DEFAULT_CNI_VERSION) -> dict[str, object]:
    """The conflist of one netd network: ``netd-cni`` on ``pool`` via the node's agent,
    with the runtime capabilities it honours (a fixed IP or MAC) (pure)."""
    if cni_version not in ("0.4.0", "1.0.0", "1.1.0"):
        raise InstallError(f"cniVersion {cni_version!r}: netd writes 0.4.0, 1.0.0 or 1.1.0")
    for what, value in (("network", network), ("pool", pool)):
        if not value or any(c.isspace() or c in "/\\" for c in value) or len(value) > 64:
            raise InstallError(f"{what} {value!r} is not a name (1-64 characters, no "
                               "spaces or slashes)")
    if not agent_socket.startswith("/"):
        raise InstallError(f"agent socket {agent_socket!r} is not an absolute path")
    return {"cniVersion": cni_version, "name": network,
            "plugins": [{"type": "netd-cni", "pool": pool, "agentSocket": agent_socket,
                         "capabilities": {"ips": True, "mac": True}}]}


def write_conflist(conf_dir: Path, doc: dict[str, object],
                   name: str = CONFLIST_NAME) -> Installed:
    """``doc`` into ``conf_dir/name``, atomically (a runtime reads the directory any
    time); unchanged when it is already there."""
    import json

    try:
        conf_dir.mkdir(parents=True, exist_ok=True)
        path = conf_dir / name
        text = json.dumps(doc, indent=2) + "\n"
        return Installed(path, atomic_write(path, text.encode(), 0o644), "CNI network")
    except OSError as exc:
        raise InstallError(f"cannot write the conflist into {conf_dir}: {exc}") from None


__all__ = [
    "CONFLIST_NAME",
    "DEFAULT_BIN_DIR",
    "DEFAULT_CNI_VERSION",
    "DEFAULT_CONF_DIR",
    "PLUGINS",
    "InstallError",
    "Installed",
    "build_native",
    "c_config",
    "c_source",
    "c_string",
    "conflist",
    "default_plugin_python",
    "find_cc",
    "install",
    "plugin_code",
    "plugin_launcher",
    "plugin_script",
    "precompile_shim",
    "shebang",
    "shim_source",
    "write_conflist",
]
