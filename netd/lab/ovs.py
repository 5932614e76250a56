"""Open vSwitch for a lab host: its own ovsdb-server and ovs-vswitchd in its namespace.

This kernel has no openvswitch module, so a lab's bridges use the userspace
datapath (``datapath_type=netdev``), one pair of daemons per host namespace
(shared/DESIGN.md). Everything of an instance lives in one directory: the
database, the db socket, the bridges' management sockets (``OVS_RUNDIR``), the
pid files and the logs. A production host runs its distribution's OVS instead;
the agent only needs the db socket and the run directory ([vlan] ovsdb,
rundir).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netd.lab.procs import alive, recorded_process_alive, start_process, stop_pids, tail

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
OVSDB_SERVER = "/usr/sbin/ovsdb-server"
OVS_VSWITCHD = "/usr/sbin/ovs-vswitchd"
OVSDB_TOOL = "/usr/bin/ovsdb-tool"
OVS_VSCTL = "/usr/bin/ovs-vsctl"


class OvsLabError(RuntimeError):
    pass


def available() -> bool:
    return all(os.access(p, os.X_OK) for p in (OVSDB_SERVER, OVS_VSWITCHD, OVSDB_TOOL)) \
        and SCHEMA.exists()


@dataclass
class OvsInstance:
    """ovsdb-server + ovs-vswitchd of one namespace, in ``dir``."""

    netns: str
    dir: Path
    #: ``other_config:userspace-tso-enable`` before ovs-vswitchd starts (it reads it
    #: only then): TSO and checksum offload through the userspace datapath
    userspace_tso: bool = False

    @property
    def db_sock(self) -> Path:
        return self.dir / "db.sock"

    @property
    def url(self) -> str:
        return f"unix:{self.db_sock}"

    def mgmt(self, bridge: str) -> Path:
        return self.dir / f"{bridge}.mgmt"

    @property
    def env(self) -> dict[str, str]:
        d = str(self.dir)
        return {"OVS_RUNDIR": d, "OVS_DBDIR": d, "OVS_LOGDIR": d, "OVS_SYSCONFDIR": d}

    def _server_argv(self) -> list[str]:
        return [OVSDB_SERVER, str(self.dir / "conf.db"), f"--remote=punix:{self.db_sock}",
                f"--pidfile={self.dir / 'ovsdb-server.pid'}",
                f"--unixctl={self.dir / 'ovsdb-server.ctl'}",
                f"--log-file={self.dir / 'ovsdb-server.log'}", "-vconsole:off"]

    def _vswitchd_argv(self) -> list[str]:
        return [OVS_VSWITCHD, self.url, f"--pidfile={self.dir / 'ovs-vswitchd.pid'}",
                f"--unixctl={self.dir / 'ovs-vswitchd.ctl'}",
                f"--log-file={self.dir / 'ovs-vswitchd.log'}", "-vconsole:off"]

    def start(self, timeout: float = 30.0) -> dict[str, Any]:
        """Create the database (once), start both daemons; their process records."""
        if not available():
            raise OvsLabError("Open vSwitch is missing: apt-get install openvswitch-switch")
        self.dir.mkdir(parents=True, exist_ok=True)
        db = self.dir / "conf.db"
        if not db.exists():
            subprocess.run([OVSDB_TOOL, "create", str(db), str(SCHEMA)], check=True,
                           capture_output=True, timeout=30)
        server = start_process(self.netns, self._server_argv(), self.dir / "ovsdb-server.out",
                               env=self.env)
        self._wait("ovsdb-server", self._db_answers, server, timeout)
        subprocess.run([OVS_VSCTL, f"--db={self.url}", "--no-wait", "init"], check=True,
                       capture_output=True, timeout=30)
        if self.userspace_tso:
            subprocess.run([OVS_VSCTL, f"--db={self.url}", "--no-wait", "set",
                            "Open_vSwitch", ".", "other_config:userspace-tso-enable=true"],
                           check=True, capture_output=True, timeout=30)
        vswitchd = self.start_vswitchd(timeout)
        return {"ovsdb_server": server, "ovs_vswitchd": vswitchd}

    def start_vswitchd(self, timeout: float = 30.0) -> dict[str, Any]:
        rec = start_process(self.netns, self._vswitchd_argv(), self.dir / "ovs-vswitchd.out",
                            env=self.env)
        self._wait("ovs-vswitchd", lambda: (self.dir / "ovs-vswitchd.ctl").exists(), rec,
                   timeout)
        return rec

    def _db_answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.db_sock))
            except OSError:
                return False
        return True

    def _wait(self, what: str, ready: Any, rec: dict[str, Any], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not alive(rec["pid"]):
                raise OvsLabError(f"{what} in {self.netns} exited:\n"
                                  f"{tail(self.dir / f'{what}.log')}")
            if time.monotonic() > deadline:
                raise OvsLabError(f"{what} in {self.netns} not ready after {timeout:g} s")
            time.sleep(0.02)

    def vswitchd_pid(self) -> int | None:
        try:
            pid = int((self.dir / "ovs-vswitchd.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def stop_vswitchd(self, kill: bool = False) -> None:
        pid = self.vswitchd_pid()
        if pid is None:
            return
        if kill:
            os.kill(pid, 9)
            deadline = time.monotonic() + 5
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            stop_pids([pid])
        (self.dir / "ovs-vswitchd.ctl").unlink(missing_ok=True)

    def restart_vswitchd(self, kill: bool = False) -> dict[str, Any]:
        self.stop_vswitchd(kill=kill)
        return self.start_vswitchd()

    def stop(self, records: dict[str, Any] | None = None) -> None:
        pids = [p for p in (recorded_process_alive(r) for r in (records or {}).values())
                if p is not None]
        vs = self.vswitchd_pid()
        if vs is not None:
            pids.append(vs)
        try:
            server = int((self.dir / "ovsdb-server.pid").read_text().strip())
            pids.append(server)
        except (OSError, ValueError):
            pass
        stop_pids(pids)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


__all__ = ["OvsInstance", "OvsLabError", "available"]
