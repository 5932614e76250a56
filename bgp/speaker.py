"""The host's BGP speaker: an exabgp 5 process the agent drives (the I/O edge).

The agent starts exabgp with a generated configuration (:func:`render_config`)
whose one process is :mod:`netd.bgp.relay`, connected back to a root-only
socket of the agent. Every command waits for its ack (``done``/``error``) with
a deadline; events update one :class:`RibIn` per peer; when a session comes
up, everything the host announces is sent to that peer again and then
End-of-RIB (``manual-eor``): a restarted agent re-announces all before the
ToR drops the stale routes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from netd.dataplane.errors import DataplaneError

from .driver import BgpSettings
from .exabgp import Event, announce, end_of_rib, parse_line, render_config, withdraw
from .routes import RibIn

log = logging.getLogger(__name__)

ACK_TIMEOUT = 5.0
CONNECT_TIMEOUT = 20.0


class SpeakerError(DataplaneError):
    code = "bgp_speaker"


def exabgp_binary() -> str:
    """exabgp next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / "exabgp"
    return str(here) if here.exists() else "exabgp"


class Speaker:
    """One exabgp for this host; thread-safe."""

    def __init__(self, settings: BgpSettings, workdir: Path, *, router_id: str,
                 local_address: str | None = None, netns: str | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.netns = netns  # exabgp runs there (a lab host); None: this namespace
        self.dir = Path(workdir)
        self.router_id = router_id
        self.local_address = local_address
        self.on_change = on_change
        self.ribs: dict[str, RibIn] = {p.address: RibIn() for p in settings.peers}
        self.announced: set[str] = set()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: socket.socket | None = None
        self._acks: queue.Queue[bool] = queue.Queue()
        self._lock = threading.Lock()  # one command in flight (acks come in order)
        self._state = threading.Lock()
        self._reader: threading.Thread | None = None
        self._refresh: queue.Queue[str] = queue.Queue()
        # End-of-RIB only once the agent has said what it announces: a restarted agent
        # that sent it with nothing yet would make the peers drop every route it had
        self.ready = threading.Event()

    @property
    def socket_path(self) -> Path:
        return self.dir / "speaker.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "exabgp.pid"

    def kill_leftover(self) -> bool:
        """An exabgp an earlier agent left running (it was killed -9): SIGKILL it, no
        NOTIFICATION, so the peers treat it as a restart and keep the routes."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return False
        if not any(b"exabgp" in part for part in cmdline) \
                or str(self.dir / "exabgp.conf").encode() not in cmdline:
            return False  # the pid went to someone else
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        log.info("bgp: killed the exabgp (pid %d) an earlier agent left", pid)
        return True

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.kill_leftover()
        self.socket_path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            server.bind(str(self.socket_path))
        finally:
            os.umask(old)
        server.listen(1)
        conf = self.dir / "exabgp.conf"
        conf.write_text(render_config(
            self.settings, [sys.executable, "-m", "netd.bgp.relay", str(self.socket_path)],
            router_id=self.router_id, local_address=self.local_address))
        env = {**os.environ, "exabgp_daemon_user": "root", "exabgp_daemon_daemonize": "false",
               "exabgp_api_cli": "false", "exabgp_log_destination": str(self.dir / "exabgp.log"),
               "exabgp_api_ack": "true", "exabgp_log_processes": "false"}
        log_file = (self.dir / "exabgp.out").open("ab")
        try:
            argv = [exabgp_binary(), str(conf)]
            if self.netns is not None:
                argv = ["ip", "netns", "exec", self.netns, *argv]
            self._proc = subprocess.Popen(argv, env=env,
                                          stdout=log_file, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        finally:
            log_file.close()
        self.pidfile.write_text(f"{self._proc.pid}\n")
        server.settimeout(CONNECT_TIMEOUT)
        try:
            self._conn, _ = server.accept()
        except TimeoutError:
            self.stop()
            raise SpeakerError(f"exabgp did not start its process within "
                               f"{CONNECT_TIMEOUT:g} s (see {self.dir / 'exabgp.out'})"
                               ) from None
        finally:
            server.close()
        self._reader = threading.Thread(target=self._read, name="netd-bgp-events",
                                        daemon=True)
        self._reader.start()
        threading.Thread(target=self._refresher, name="netd-bgp-refresh", daemon=True).start()

    def stop(self, *, graceful: bool = True) -> None:
        """``graceful``: SIGKILL, so that exabgp sends no NOTIFICATION and the peers keep
        the routes for the restart time (an agent restart loses none; an agent gone for
        good loses them after it). Otherwise SIGTERM: the sessions close, the routes go."""
        if self._proc is not None and self._proc.poll() is None:
            if graceful:
                self._proc.kill()
            else:
                self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None
        self._refresh.put("")  # ends the refresher

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # --- events ----------------------------------------------------------------------------

    def _read(self) -> None:
        assert self._conn is not None
        buf = b""
        try:
            while chunk := self._conn.recv(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._event(parse_line(line.decode(errors="replace")))
        except OSError:
            pass
        log.warning("bgp: exabgp's process went away")

    def _event(self, ev: Event) -> None:
        if ev.kind == "ack":
            self._acks.put(ev.ok)
            return
        if ev.peer not in self.ribs:
            return
        with self._state:
            self.ribs[ev.peer].apply(ev, time.monotonic())
        if ev.kind == "state":
            level = logging.WARNING if ev.state == "down" and ev.reason else logging.INFO
            log.log(level, "bgp: session with %s %s%s", ev.peer, ev.state,
                    f" ({ev.reason})" if ev.reason else "")
            if ev.state == "up":
                self._refresh.put(ev.peer)  # not from the reader: it must read the acks
        if ev.kind in ("state", "update") and self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("bgp: programming the received routes failed")

    def _refresher(self) -> None:
        while peer := self._refresh.get():
            while not self.ready.wait(1.0):
                if self._conn is None:
                    return
            try:
                self.refresh(peer)
            except SpeakerError as exc:
                log.warning("bgp: re-announcing to %s failed: %s", peer, exc.message)

    # --- commands --------------------------------------------------------------------------

    def command(self, line: str, timeout: float = ACK_TIMEOUT) -> None:
        """Send one command and wait for its ack; :class:`SpeakerError` otherwise."""
        with self._lock:
            if self._conn is None:
                raise SpeakerError("the BGP speaker is not running")
            while not self._acks.empty():  # a late ack of a command that timed out
                self._acks.get_nowait()
            try:
                self._conn.sendall(line.encode() + b"\n")
            except OSError as exc:
                raise SpeakerError(f"exabgp: {exc}") from None
            try:
                ok = self._acks.get(timeout=timeout)
            except queue.Empty:
                raise SpeakerError(f"exabgp did not answer {line[:60]!r} within "
                                   f"{timeout:g} s") from None
        if not ok:
            raise SpeakerError(f"exabgp refused {line[:80]!r}")

    def status(self) -> dict[str, Any]:
        """Per peer: session state, why it last went down, routes received, End-of-RIB."""
        asns = {p.address: p.asn for p in self.settings.peers}
        with self._state:
            peers = {p: {"asn": asns.get(p), "state": r.state, "up": r.up,
                         "reason": r.reason, "received": len(r.routes), "eor": r.eor}
                     for p, r in self.ribs.items()}
            announced = len(self.announced)
        running = self._proc is not None and self._proc.poll() is None
        return {"exabgp_pid": self.pid if running else None, "peers": peers,
                "announced": announced}

    def established(self) -> list[str]:
        with self._state:
            return [p for p, r in self.ribs.items() if r.up]

    def set_announced(self, prefixes: Iterable[str]) -> list[str]:
        """Announce what is new, withdraw what is gone (to every established peer)."""
        want = set(prefixes)
        with self._state:
            add, gone = sorted(want - self.announced), sorted(self.announced - want)
            self.announced = want
        self.ready.set()
        done = []
        for peer in self.established():
            for cmd in [*announce(add, neighbor=peer), *withdraw(gone, neighbor=peer)]:
                self.command(cmd)
                done.append(cmd)
        return done

    def refresh(self, peer: str) -> None:
        """A session came up: everything announced again, then End-of-RIB."""
        with self._state:
            prefixes = sorted(self.announced)
        t0 = time.monotonic()
        for cmd in announce(prefixes, neighbor=peer):
            self.command(cmd)
        self.command(end_of_rib(peer))
        log.info("bgp: %d prefixes and End-of-RIB to %s in %.2f s", len(prefixes), peer,
                 time.monotonic() - t0)


__all__ = ["Speaker", "SpeakerError", "exabgp_binary"]
