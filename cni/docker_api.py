"""The little the Docker driver asks dockerd's own API (``docker_host``, a unix socket).

The plugin protocol never names the container: libnetwork's calls carry
network, endpoint and sandbox ids only. The endpoint's name (the container's
name) is read back from ``GET /networks/{id}`` after ``Join``, and a fixed
address reserved for a handle is matched to the container that asked for it
with ``GET /containers/json`` (served from dockerd's snapshot, which never
waits on a container being started). These calls are never made while
dockerd waits for this plugin's answer, except the last one, which does not
block in dockerd.

Every method answers None (or False) when dockerd cannot be asked; callers
treat that as "unknown", never as "gone".
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx

from netd.errors import Unavailable

log = logging.getLogger("netd.cni.docker")

DEFAULT_HOST = "unix:///var/run/docker.sock"


def socket_of(docker_host: str) -> str:
    """``unix:///path`` (or a plain path) -> the socket path."""
    if docker_host.startswith("unix://"):
        return docker_host[len("unix://"):]
    if docker_host.startswith("/"):
        return docker_host
    raise ValueError(f"docker_host must be unix:///PATH, not {docker_host!r}")


class DockerApi:
    def __init__(self, docker_host: str = DEFAULT_HOST, timeout: float = 3.0) -> None:
        self.path = socket_of(docker_host)
        self.timeout = timeout

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        """The decoded answer; None on 404; raises OSError/httpx errors when unreachable."""
        transport = httpx.HTTPTransport(uds=self.path)
        with httpx.Client(transport=transport, base_url="http://docker",
                          timeout=self.timeout) as client:
            r = client.get(path, params=params)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.json()

    def network(self, network_id: str) -> dict[str, Any] | None:
        """``docker network inspect``; None when dockerd has no such network.

        Raises :class:`DockerUnreachable` when dockerd cannot be asked.
        """
        try:
            doc = self._get(f"/networks/{network_id}")
        except (OSError, httpx.HTTPError, ValueError) as exc:
            raise DockerUnreachable(f"dockerd at {self.path}: {exc}") from exc
        return doc if isinstance(doc, dict) else None

    def networks(self, driver: str) -> list[dict[str, Any]] | None:
        """``docker network ls`` of one driver, inspected; None when dockerd cannot be asked."""
        try:
            found = self._get("/networks", params={"filters": json.dumps({"driver": [driver]})})
        except (OSError, httpx.HTTPError, ValueError) as exc:
            log.warning("docker: cannot list dockerd's %s networks at %s: %s", driver,
                        self.path, exc)
            return None
        return [n for n in found or [] if isinstance(n, dict)]

    def endpoint_name(self, network_id: str, endpoint_id: str) -> str | None:
        """The container name of an endpoint, once dockerd lists it; None when not (yet)."""
        try:
            net = self.network(network_id)
        except DockerUnreachable:
            return None
        for entry in ((net or {}).get("Containers") or {}).values():
            if isinstance(entry, dict) and entry.get("EndpointID") == endpoint_id:
                name = entry.get("Name")
                return str(name) if name else None
        return None

    def container_asks_for(self, name: str, ip: str) -> bool:
        """Whether a container called ``name`` was created with ``--ip ip`` on some network."""
        try:
            found = self._get("/containers/json", params={
                "all": "1", "filters": json.dumps({"name": [f"^/{name}$"]})})
        except (OSError, httpx.HTTPError, ValueError) as exc:
            log.warning("docker: cannot ask dockerd at %s about container %s: %s", self.path,
                        name, exc)
            return False
        for c in found or []:
            if f"/{name}" not in (c.get("Names") or []):
                continue
            nets = ((c.get("NetworkSettings") or {}).get("Networks") or {}).values()
            for settings in nets:
                ipam = (settings or {}).get("IPAMConfig") or {}
                if ipam.get("IPv4Address") == ip:
                    return True
        return False


class DockerUnreachable(Unavailable):
    """dockerd's API did not answer."""
