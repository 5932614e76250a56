"""The CNI side of the agent: a plugin run (command, CNI_* environment, network config) in,
the agent's endpoint pipeline, the CNI answer out.

Like a reference plugin's ``cmdAdd`` / ``cmdDel`` / ``cmdCheck``: parse
(:mod:`.protocol`), turn the request into the agent's vocabulary
(:class:`~netd.agent.service.EndpointRequest`), call the agent, build the result
from what the driver attached. Every netd error becomes a CNI error here, in
one place (:func:`cni_error`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from netd.agent.errors import DuplicateAddress, InterfaceInUse, NotAttached
from netd.agent.service import Agent, EndpointRequest
from netd.agent.state import Attachment
from netd.dataplane.errors import (
    DataplaneError,
    NetnsNotFound,
    NotAContainerNetns,
    PoolNotUsable,
)
from netd.errors import (
    AddressInUse,
    InvalidInput,
    MacInUse,
    NetdError,
    PoolExhausted,
    PoolNotFound,
    Unauthorized,
    Unavailable,
)

from . import protocol as cni
from .protocol import CniError, CniRequest

log = logging.getLogger("netd.cni")


def cni_error(exc: NetdError) -> CniError:
    """Map a netd error to the CNI error code a runtime sees (docs/AGENT.md)."""
    if isinstance(exc, NetnsNotFound):
        return CniError(cni.UNKNOWN_CONTAINER, exc.message)
    if isinstance(exc, NotAContainerNetns):
        return CniError(cni.INVALID_ENVIRONMENT, exc.message)
    if isinstance(exc, PoolNotUsable):  # the config names a pool this mode cannot serve
        return CniError(cni.INVALID_CONFIG, exc.message)
    if isinstance(exc, NotAttached):
        return CniError(cni.CHECK_FAILED, exc.message)
    if isinstance(exc, InterfaceInUse):
        return CniError(cni.INTERFACE_IN_USE, exc.message)
    if isinstance(exc, DuplicateAddress):
        return CniError(cni.ADDRESS_IN_USE, exc.message)
    if isinstance(exc, DataplaneError):
        return CniError(cni.DATAPLANE_FAILURE, exc.message)
    if isinstance(exc, Unavailable):
        return CniError(cni.TRY_AGAIN_LATER, "try again later: IPAM unreachable", exc.message)
    if isinstance(exc, PoolNotFound):
        return CniError(cni.POOL_NOT_FOUND, exc.message)
    if isinstance(exc, PoolExhausted):
        return CniError(cni.POOL_EXHAUSTED, exc.message)
    if isinstance(exc, AddressInUse | MacInUse):
        return CniError(cni.ADDRESS_IN_USE, exc.message)
    if isinstance(exc, Unauthorized):
        return CniError(cni.IPAM_REFUSED, "the IPAM refused the agent's token", exc.message)
    if isinstance(exc, InvalidInput):
        return CniError(cni.IPAM_REFUSED, exc.message)
    return CniError(cni.IPAM_REFUSED, exc.message)


def endpoint_request(req: CniRequest) -> EndpointRequest:
    """A CNI ADD in the agent's terms: owner, labels, fixed-address handle, requested IP/MAC."""
    labels = {"netd.network": req.network}
    handle = req.args.get("NETD_HANDLE")
    pod_ns, pod = req.args.get("K8S_POD_NAMESPACE"), req.args.get("K8S_POD_NAME")
    if pod_ns and pod:  # kubelet: the pod's namespace/name is its stable identity
        labels["k8s.pod"] = f"{pod_ns}/{pod}"
        handle = handle or f"{pod_ns}/{pod}"
    elif pod:  # podman passes only K8S_POD_NAME: the container's name
        labels["container.name"] = pod
        handle = handle or pod
    # a fixed address: CNI_ARGS IP=/MAC= or the "ips"/"mac" runtime capabilities
    rc = req.runtime_config
    ips = rc.get("ips") if isinstance(rc.get("ips"), list) else []
    ip = req.args.get("IP") or (str(ips[0]).split("/")[0] if ips else None)
    mac = req.args.get("MAC") or (rc.get("mac") if isinstance(rc.get("mac"), str) else None)
    return EndpointRequest(
        network=req.network, container_id=req.container_id, ifname=req.ifname, pool=req.pool,
        plugin=req.plugin, netns=req.netns, plumb=not req.is_ipam, labels=labels,
        handle=handle, ip=ip or None, mac=mac or None)


def result_of(att: Attachment) -> dict[str, Any]:
    """The ADD result (1.1.0 shape) of a ready attachment: what the driver configured."""
    if att.address is None:
        raise NetdError(f"attachment {att.container_id}/{att.ifname} has no address recorded")
    if att.host_ifname is None:  # netd-ipam: the address for the main plugin to configure
        return cni.build_ipam_result(address=att.address, gateway=att.gateway,
                                     routes=att.routes, dns=att.dns)
    return cni.build_result(ifname=att.ifname, mac=att.mac or "", sandbox=att.netns or "",
                            host_ifname=att.host_ifname, address=att.address,
                            gateway=att.gateway, routes=att.routes, dns=att.dns)


class CniHandler:
    """Serves the plugin shims' requests (one JSON document each) on the agent."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Serve one socket request; always answers, never raises. Counted and timed
        (the agent's metrics, when on) by command and result: ok or the CNI code."""
        t0 = time.perf_counter()
        answer = self._handle(request)
        metrics = self.agent.metrics
        command = str(request.get("command"))
        if metrics is not None and command in ("ADD", "DEL", "CHECK", "GC", "STATUS"):
            error = answer.get("error")
            result = "ok" if error is None else str(error.get("code", "error"))
            metrics.observe_request(command, result, time.perf_counter() - t0)
        return answer

    def _handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        version = cni.DEFAULT_VERSION
        try:
            if command == "AGENT_STATUS":
                return {"result": self.agent.status()}
            config = request.get("config")
            if isinstance(config, dict) and isinstance(config.get("cniVersion"), str):
                version = config["cniVersion"]
            req = cni.parse_request(str(request.get("plugin", cni.PLUGIN_CNI)), str(command),
                                    request.get("env") or {}, config)
            version = req.cni_version
            handler = {
                "ADD": self.add, "DEL": self.delete, "CHECK": self.check,
                "GC": self.gc, "STATUS": self.status,
            }[req.command]
            result = handler(req)
            return {"result": cni.convert(result, req.cni_version) if result else {}}
        except CniError as exc:
            return {"error": exc.to_dict(version)}
        except NetdError as exc:
            return {"error": cni_error(exc).to_dict(version)}
        except Exception as exc:
            log.exception("internal error serving %s", command)
            return {"error": CniError(cni.INTERNAL, f"netd agent internal error: {exc}")
                    .to_dict(version)}

    def add(self, req: CniRequest) -> dict[str, Any]:
        return result_of(self.agent.add(endpoint_request(req)))

    def delete(self, req: CniRequest) -> dict[str, Any]:
        self.agent.delete(req.network, req.container_id, req.ifname, pool=req.pool,
                          plugin=req.plugin, netns=req.netns or None)
        return {}

    def check(self, req: CniRequest) -> dict[str, Any]:
        att, problems = self.agent.check(req.network, req.container_id, req.ifname,
                                         req.netns or None)
        problems = cni.compare_prev_result(req.prev_result, result_of(att)) + problems
        if problems:
            raise CniError(cni.CHECK_FAILED, "; ".join(problems))
        return {}

    def gc(self, req: CniRequest) -> dict[str, Any]:
        self.agent.gc(req.network, {(a.container_id, a.ifname) for a in req.valid_attachments})
        return {}

    def status(self, req: CniRequest) -> dict[str, Any]:
        try:
            self.agent.ipam.health()
            pool = self.agent.ipam.get_pool(req.pool)
        except Unavailable as exc:
            raise CniError(cni.PLUGIN_NOT_AVAILABLE, "the IPAM is unreachable",
                           exc.message) from None
        except PoolNotFound as exc:
            raise CniError(cni.PLUGIN_NOT_AVAILABLE, exc.message) from None
        if int(pool.get("free", 0)) <= 0:
            raise CniError(cni.PLUGIN_NOT_AVAILABLE, f"pool {req.pool!r} has no free address")
        return {}


__all__ = ["CniHandler", "cni_error", "endpoint_request", "result_of"]
