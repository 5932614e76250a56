"""The lab's processes: start them in a namespace, recognise them again, stop them.

Daemons (the IPAM server, the agents, dockerd) are started detached with their
output in a log file and recorded in the lab's manifest; a record is "alive"
only while its pid still runs the recorded command (pids are reused).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def bin_path(name: str) -> str:
    """A console script next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def ns_argv(netns_name: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns_name, *argv]


def start_process(netns_name: str, argv: Sequence[str], log: Path,
                  env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start ``argv`` inside a namespace, detached (own session), output to ``log``.

    ``ip netns exec`` execs the command in place, so the pid is the daemon's.
    ``env``: variables added to this process's environment.
    """
    full = ns_argv(netns_name, argv)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **env} if env else None)
    return {"pid": proc.pid, "argv": list(argv), "netns": netns_name, "log": str(log),
            "started": now()}


def _proc_state(pid: int) -> str | None:
    """The process state letter (R, S, Z...), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int | None) -> bool:
    return pid is not None and _proc_state(pid) not in (None, "Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode(errors="replace") for p in raw.split(b"\0") if p]


def recorded_process_alive(rec: dict[str, Any] | None) -> int | None:
    """The pid of a recorded process when it still runs the recorded command."""
    if not rec or not isinstance(rec.get("pid"), int):
        return None
    pid = int(rec["pid"])
    if not alive(pid):
        return None
    argv = rec.get("argv") or []
    cmd = cmdline(pid)
    # the daemon is a Python console script: its cmdline is [python, script, args...]
    if argv and not any(cmd[i:i + len(argv) - 1] == argv[1:] for i in range(len(cmd))):
        return None
    return pid


def stop_pids(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the pids signalled."""
    targets = [p for p in set(pids) if alive(p)]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in targets):
        time.sleep(0.05)
    for pid in targets:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in targets):
        time.sleep(0.05)
    return targets


def tail(path: Path | str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run(argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False,
                          timeout=timeout)


__all__ = ["alive", "bin_path", "cmdline", "now", "ns_argv", "recorded_process_alive", "run",
           "start_process", "stop_pids", "tail"]
