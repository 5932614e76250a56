"""``agent.toml`` -> :class:`AgentConfig`. Pure: parsing and validation only.

The agent's own keys are checked here; the mode's table (``[l2]``, ``[vlan]``,
``[bgp]``) belongs to the mode's driver, which parses it
(:meth:`netd.dataplane.driver.Driver.parse_settings`). Tables of other modes
may be present (one file for a fleet) and are left alone.
"""

from __future__ import annotations

import ipaddress
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netd.dataplane.registry import driver_class
from netd.errors import InvalidInput

#: every mode's table name, known or not yet available
MODE_TABLES = ("l2", "vlan", "bgp")
TOP_LEVEL = ("host", "mode", "ipam_url", "token_file", "socket", "state_dir", "docker_plugin",
             "docker_socket", "docker_host", "ipam_timeout", "reconcile_interval",
             "sync_interval", "metrics_listen")


@dataclass(frozen=True)
class AgentConfig:
    host: str
    mode: str = "l2"
    ipam_url: str = "http://127.0.0.1:9650"
    token_file: str | None = None
    socket: str = "/run/netd/agent.sock"
    state_dir: str = "/var/lib/netd"
    docker_plugin: bool = False
    # where the Docker plugin socket goes (dockerd finds /run/docker/plugins/NAME.sock)
    docker_socket: str = "/run/docker/plugins/netd.sock"
    # dockerd's API, asked for the container names of endpoints (unix:///PATH)
    docker_host: str = "unix:///var/run/docker.sock"
    # how long one IPAM call may take before the agent gives up (DEL queues)
    ipam_timeout: float = 5.0
    # seconds between reconcile passes while serving (repairs, records that failed)
    reconcile_interval: float = 60.0
    # seconds between passes that follow the IPAM's changes (allowed extra addresses)
    sync_interval: float = 5.0
    # Prometheus metrics on this loopback HOST:PORT (None: off)
    metrics_listen: str | None = None
    # the mode's driver settings (parsed by its driver) and every mode table as written
    driver_settings: Any = None
    tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def token(self) -> str | None:
        if not self.token_file:
            return None
        try:
            return Path(self.token_file).read_text().strip() or None
        except OSError as exc:
            raise InvalidInput(f"cannot read token file {self.token_file}: {exc}") from None


def _get(table: Mapping[str, Any], key: str, typ: type | tuple[type, ...], default: Any) -> Any:
    value = table.get(key, default)
    if value is default:
        return value
    numeric = typ in ((int, float), int, float)
    if not isinstance(value, typ) or (numeric and isinstance(value, bool)):
        raise InvalidInput(f"{key}: expected {getattr(typ, '__name__', typ)}, "
                           f"got {type(value).__name__}")
    return value


def check_metrics_listen(text: str) -> None:
    """``metrics_listen``: a loopback HOST:PORT (the metrics name every container)."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"metrics_listen must be a loopback HOST:PORT (127.0.0.1:9651), "
                           f"not {text!r}")


def parse_config(doc: Mapping[str, Any]) -> AgentConfig:
    unknown = set(doc) - set(TOP_LEVEL) - set(MODE_TABLES)
    if unknown:
        raise InvalidInput(f"unknown agent config keys: {', '.join(sorted(unknown))}")
    mode = _get(doc, "mode", str, "l2")
    cls = driver_class(mode)
    tables = {}
    for name in MODE_TABLES:
        table = doc.get(name, {})
        if not isinstance(table, dict):
            raise InvalidInput(f"[{name}] must be a table")
        tables[name] = table
    settings = cls.parse_settings(tables.get(mode, {}))
    ipam_url = _get(doc, "ipam_url", str, "http://127.0.0.1:9650")
    if not ipam_url.startswith(("http://", "https://")):
        raise InvalidInput(f"ipam_url must be an http(s) URL, not {ipam_url!r}")
    docker_socket = _get(doc, "docker_socket", str, "/run/docker/plugins/netd.sock")
    if not docker_socket.startswith("/"):
        raise InvalidInput(f"docker_socket must be an absolute path, not {docker_socket!r}")
    docker_host = _get(doc, "docker_host", str, "unix:///var/run/docker.sock")
    if not docker_host.startswith("unix:///"):
        raise InvalidInput(f"docker_host must be unix:///PATH, not {docker_host!r}")
    metrics_listen = _get(doc, "metrics_listen", str, None)
    if metrics_listen is not None:
        check_metrics_listen(metrics_listen)
    ipam_timeout = float(_get(doc, "ipam_timeout", (int, float), 5.0))
    interval = float(_get(doc, "reconcile_interval", (int, float), 60.0))
    sync = float(_get(doc, "sync_interval", (int, float), 5.0))
    if ipam_timeout <= 0 or interval <= 0 or sync <= 0:
        raise InvalidInput("ipam_timeout, reconcile_interval and sync_interval must be > 0 "
                           "seconds")
    return AgentConfig(
        host=_get(doc, "host", str, socket.gethostname()),
        mode=mode,
        ipam_url=ipam_url.rstrip("/"),
        token_file=_get(doc, "token_file", str, None),
        socket=_get(doc, "socket", str, "/run/netd/agent.sock"),
        state_dir=_get(doc, "state_dir", str, "/var/lib/netd"),
        docker_plugin=_get(doc, "docker_plugin", bool, False),
        docker_socket=docker_socket,
        docker_host=docker_host,
        ipam_timeout=ipam_timeout,
        reconcile_interval=interval,
        sync_interval=sync,
        metrics_listen=metrics_listen,
        driver_settings=settings,
        tables=tables,
    )


def load_config(path: str) -> AgentConfig:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise InvalidInput(f"cannot read agent config {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"agent config {path} is not valid TOML: {exc}") from None
    return parse_config(doc)


__all__ = ["AgentConfig", "load_config", "parse_config"]
