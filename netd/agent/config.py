"""``agent.toml`` -> :class:`AgentConfig`. Pure: parsing and validation only."""

from __future__ import annotations

import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netd.errors import InvalidInput

MODES = ("l2", "vlan", "bgp")
#: ARP replies on a layer-2 segment arrive well under a millisecond after the probe
#: (0.06 ms median in the lab), a slow stack's in a millisecond or two; 10 ms (two
#: probes 5 ms apart) is five times that, and every ADD waits it in full (README,
#: "Why 10 ms for dad_timeout").
DEFAULT_DAD_TIMEOUT = 0.01
IMPLEMENTED_MODES = ("l2",)


@dataclass(frozen=True)
class L2Config:
    uplink: str = "bond0"
    bridge: str = "br0"
    # take br0 over at start (move the uplink's address, routes and MAC)
    takeover: bool = True
    # after the takeover the default gateway must answer ARP within this time
    gateway_timeout: float = 10.0
    # ARP duplicate-address probe per new address (seconds to wait for an answer; two
    # probes, half of it apart); 0 disables it. See README "The host agent" for why 10 ms.
    dad_timeout: float = DEFAULT_DAD_TIMEOUT


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
    l2: L2Config = field(default_factory=L2Config)
    vlan: dict[str, Any] = field(default_factory=dict)
    bgp: dict[str, Any] = field(default_factory=dict)
    # how long one IPAM call may take before the agent gives up (DEL queues)
    ipam_timeout: float = 5.0

    def token(self) -> str | None:
        if not self.token_file:
            return None
        try:
            return Path(self.token_file).read_text().strip() or None
        except OSError as exc:
            raise InvalidInput(f"cannot read token file {self.token_file}: {exc}") from None


def _get(table: dict[str, Any], key: str, typ: type | tuple[type, ...], default: Any,
         where: str) -> Any:
    value = table.get(key, default)
    if value is not default and not isinstance(value, typ):
        raise InvalidInput(f"{where}{key}: expected {getattr(typ, '__name__', typ)}, "
                           f"got {type(value).__name__}")
    return value


def parse_config(doc: dict[str, Any]) -> AgentConfig:
    known = {"host", "mode", "ipam_url", "token_file", "socket", "state_dir", "docker_plugin",
             "docker_socket", "docker_host", "l2", "vlan", "bgp", "ipam_timeout"}
    unknown = set(doc) - known
    if unknown:
        raise InvalidInput(f"unknown agent config keys: {', '.join(sorted(unknown))}")
    mode = _get(doc, "mode", str, "l2", "")
    if mode not in MODES:
        raise InvalidInput(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode not in IMPLEMENTED_MODES:
        raise InvalidInput(f"mode {mode!r} is not available yet; use mode = \"l2\"")
    l2doc = _get(doc, "l2", dict, {}, "")
    l2unknown = set(l2doc) - {"uplink", "bridge", "takeover", "gateway_timeout", "dad_timeout"}
    if l2unknown:
        raise InvalidInput(f"unknown [l2] keys: {', '.join(sorted(l2unknown))}")
    l2 = L2Config(
        uplink=_get(l2doc, "uplink", str, "bond0", "l2."),
        bridge=_get(l2doc, "bridge", str, "br0", "l2."),
        takeover=_get(l2doc, "takeover", bool, True, "l2."),
        gateway_timeout=float(_get(l2doc, "gateway_timeout", (int, float), 10.0, "l2.")),
        dad_timeout=float(_get(l2doc, "dad_timeout", (int, float), DEFAULT_DAD_TIMEOUT, "l2.")),
    )
    for name in (l2.uplink, l2.bridge):
        if not 1 <= len(name) <= 15 or "/" in name or " " in name:
            raise InvalidInput(f"invalid interface name {name!r} in [l2]")
    ipam_url = _get(doc, "ipam_url", str, "http://127.0.0.1:9650", "")
    if not ipam_url.startswith(("http://", "https://")):
        raise InvalidInput(f"ipam_url must be an http(s) URL, not {ipam_url!r}")
    docker_socket = _get(doc, "docker_socket", str, "/run/docker/plugins/netd.sock", "")
    if not docker_socket.startswith("/"):
        raise InvalidInput(f"docker_socket must be an absolute path, not {docker_socket!r}")
    docker_host = _get(doc, "docker_host", str, "unix:///var/run/docker.sock", "")
    if not docker_host.startswith("unix:///"):
        raise InvalidInput(f"docker_host must be unix:///PATH, not {docker_host!r}")
    return AgentConfig(
        host=_get(doc, "host", str, socket.gethostname(), ""),
        mode=mode,
        ipam_url=ipam_url.rstrip("/"),
        token_file=_get(doc, "token_file", str, None, ""),
        socket=_get(doc, "socket", str, "/run/netd/agent.sock", ""),
        state_dir=_get(doc, "state_dir", str, "/var/lib/netd", ""),
        docker_plugin=_get(doc, "docker_plugin", bool, False, ""),
        docker_socket=docker_socket,
        docker_host=docker_host,
        l2=l2,
        vlan=_get(doc, "vlan", dict, {}, ""),
        bgp=_get(doc, "bgp", dict, {}, ""),
        ipam_timeout=float(_get(doc, "ipam_timeout", (int, float), 5.0, "")),
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
