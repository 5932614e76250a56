"""The host agent: request -> IPAM -> dataplane driver -> result.

:class:`Agent` serves the CNI commands forwarded by the plugin shims and keeps
its own record of what it plumbed (:mod:`netd.agent.state`), so that a crash at
any moment is repaired by :meth:`Agent.reconcile` on the next start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, cast

from netd.agent import cniresult as cni
from netd.agent.cniresult import CniError, CniRequest
from netd.agent.config import AgentConfig
from netd.agent.state import Attachment, StateStore
from netd.dataplane.driver import Dataplane, Plumbing, Prepared, PreparingDataplane
from netd.dataplane.errors import AddressConflict, DataplaneError, NetnsNotFound
from netd.dataplane.l2 import host_ifname_for
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
from netd.ipam.client import IpamApi

log = logging.getLogger("netd.agent")

DAD_ATTEMPTS = 3


def _cni_error(exc: NetdError) -> CniError:
    """Map a netd error to the CNI error code a runtime sees (docs/AGENT.md)."""
    if isinstance(exc, NetnsNotFound):
        return CniError(cni.UNKNOWN_CONTAINER, exc.message)
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


class Agent:
    """One host's agent. Receives its collaborators; starts nothing by itself."""

    def __init__(self, cfg: AgentConfig, ipam: IpamApi, dataplane: Dataplane,
                 state: StateStore, *, release_ipam: IpamApi | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.ipam = ipam
        # DEL must never hang on the network: a client with a short timeout
        self.release_ipam = release_ipam or ipam
        self.dp = dataplane
        self.state = state
        self.clock = clock
        self._locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # the driver's prepare() of each ADD runs here, next to its IPAM call
        self._background = ThreadPoolExecutor(max_workers=32,
                                              thread_name_prefix="netd-prepare")
        self.started = clock()
        self.repaired: list[str] = []

    # --- entry point --------------------------------------------------------

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Serve one socket request; always answers, never raises."""
        command = request.get("command")
        version = cni.DEFAULT_VERSION
        try:
            if command == "AGENT_STATUS":
                return {"result": self.status()}
            config = request.get("config")
            if isinstance(config, dict) and isinstance(config.get("cniVersion"), str):
                version = config["cniVersion"]
            req = cni.parse_request(str(request.get("plugin", "netd-cni")), str(command),
                                    request.get("env") or {}, config)
            version = req.cni_version
            handler = {
                "ADD": self.add, "DEL": self.delete, "CHECK": self.check,
                "GC": self.gc, "STATUS": self.cni_status,
            }[req.command]
            result = handler(req)
            return {"result": cni.convert(result, req.cni_version) if result else {}}
        except CniError as exc:
            return {"error": exc.to_dict(version)}
        except NetdError as exc:
            return {"error": _cni_error(exc).to_dict(version)}
        except Exception as exc:
            log.exception("internal error serving %s", command)
            return {"error": CniError(cni.INTERNAL, f"netd agent internal error: {exc}")
                    .to_dict(version)}

    @contextmanager
    def _locked(self, key: tuple[str, str, str]) -> Iterator[None]:
        """Serialise work on one owner: (network, container id, ifname).

        The lock is per (container id, ifname), whatever the network: that is
        the owner in the IPAM, and queued releases name no network.
        """
        key = ("", key[1], key[2])
        with self._locks_guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield
        with self._locks_guard:
            if not lock.locked():
                self._locks.pop(key, None)

    # --- ADD ----------------------------------------------------------------

    def add(self, req: CniRequest) -> dict[str, Any]:
        key = (req.network, req.container_id, req.ifname)
        with self._locked(key):
            # A release queued by an earlier failed attempt of this owner must
            # not free what this ADD is about to get (the IPAM answers an
            # owner's retry with the address it already holds).
            if self.state.drop_releases(req.container_id, req.ifname):
                log.info("ADD %s/%s: dropped its queued release", req.container_id, req.ifname)
            existing = self.state.get(*key)
            if existing is not None:
                if existing.state == "ready" and existing.netns == req.netns:
                    return existing.result
                self._undo(existing, "replaced by a new ADD")
            if not self.dp.netns_exists(req.netns):
                raise CniError(cni.UNKNOWN_CONTAINER,
                               f"network namespace {req.netns} does not exist")
            ipam_only = req.plugin == "netd-ipam"
            att = Attachment(
                network=req.network, container_id=req.container_id, ifname=req.ifname,
                plugin=req.plugin, state="adding", netns=req.netns, pool=req.pool,
                host_ifname=None if ipam_only else host_ifname_for(req.container_id, req.ifname),
            )
            self.state.put(att)  # before anything exists, so a crash can be undone
            try:
                result = self._add_ipam(req, att) if ipam_only else self._add_link(req, att)
            except BaseException as exc:
                log.warning("ADD %s/%s failed, undoing: %s", req.container_id, req.ifname, exc)
                # IPAM unreachable: queue the release at once instead of waiting for
                # another timeout, so that the ADD fails fast with 11
                self._undo(att, "failed ADD", ipam_down=isinstance(exc, Unavailable))
                raise
            att.state = "ready"
            att.result = result
            self.state.put(att)
            return result

    def _allocate(self, req: CniRequest) -> dict[str, Any]:
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
        return self.ipam.allocate(req.pool, req.container_id, req.ifname, host=self.cfg.host,
                                  netns=req.netns, labels=labels, ip=ip or None,
                                  mac=mac or None, handle=handle)

    def _add_ipam(self, req: CniRequest, att: Attachment) -> dict[str, Any]:
        alloc = self._allocate(req)
        att.ip, att.mac = alloc["ip"], alloc["mac"]
        return cni.build_ipam_result(
            address=alloc["address"], gateway=alloc.get("gateway"),
            routes=self._routes(alloc), dns=alloc.get("dns") or {})

    @staticmethod
    def _routes(alloc: dict[str, Any]) -> list[tuple[str, str | None]]:
        default = "0.0.0.0/0" if ":" not in alloc["ip"] else "::/0"
        routes: list[tuple[str, str | None]] = []
        if alloc.get("gateway"):
            routes.append((default, alloc["gateway"]))
        routes += [(r["dst"], r.get("gw") or alloc.get("gateway")) for r in
                   alloc.get("routes") or []]
        return routes

    def _plumbing(self, req: CniRequest | Attachment, alloc: dict[str, Any],
                  host_ifname: str) -> Plumbing:
        return Plumbing(
            netns=req.netns, ifname=req.ifname, host_ifname=host_ifname, mac=alloc["mac"],
            address=alloc["address"], gateway=alloc.get("gateway"),
            routes=tuple(self._routes(alloc)), vlan=alloc.get("vlan"),
            extra={"container_id": req.container_id},
        )

    def _add_link(self, req: CniRequest, att: Attachment) -> dict[str, Any]:
        assert att.host_ifname is not None
        # the interface needs no address: the driver makes it while the IPAM allocates
        preparing = self._prepare(req, att.host_ifname)
        try:
            alloc = self._allocate(req)
        except BaseException:
            self._discard(preparing)  # made or not, it is settled before the undo
            raise
        prepared = preparing.result() if preparing is not None else None
        try:
            return self._attach_allocated(req, att, alloc, prepared)
        finally:
            if prepared is not None:
                prepared.close()  # attach consumed it; closing again is a no-op

    def _prepare(self, req: CniRequest, host_ifname: str) -> Future[Prepared] | None:
        prepare = getattr(self.dp, "prepare", None)
        if prepare is None:
            return None
        future: Future[Prepared] = self._background.submit(
            prepare, req.netns, req.ifname, host_ifname, req.container_id)
        return future

    @staticmethod
    def _discard(preparing: Future[Prepared] | None) -> None:
        if preparing is None:
            return
        try:
            preparing.result().close()
        except Exception as exc:  # the ADD fails anyway; the undo removes what is there
            log.debug("preparing the interface failed too: %s", exc)

    def _attach_allocated(self, req: CniRequest, att: Attachment, alloc: dict[str, Any],
                          prepared: Prepared | None) -> dict[str, Any]:
        assert att.host_ifname is not None
        for attempt in range(DAD_ATTEMPTS):
            att.ip, att.mac = alloc["ip"], alloc["mac"]
            p = self._plumbing(req, alloc, att.host_ifname)
            try:
                if prepared is not None:
                    # mypy: only PreparingDataplane has prepare(), hence the prepared
                    cast(PreparingDataplane, self.dp).attach(p, self.cfg.l2.dad_timeout,
                                                             prepared)
                else:
                    self.dp.attach(p, self.cfg.l2.dad_timeout)
                break
            except AddressConflict as exc:
                prepared = None  # attach consumed it; the next attempt makes a new veth
                # Someone on the wire already uses this address: never hand it out.
                note = f"duplicate: answered ARP from {exc.mac} (seen by {self.cfg.host})"
                log.warning("%s is in use on the wire by %s; reserving it", exc.ip, exc.mac)
                self.ipam.release(pool=req.pool, container_id=req.container_id,
                                  ifname=req.ifname)
                try:
                    self.ipam.reserve(req.pool, exc.ip, note=note)
                except NetdError as err:
                    log.warning("could not reserve duplicate %s: %s", exc.ip, err)
                if attempt == DAD_ATTEMPTS - 1:
                    raise CniError(cni.ADDRESS_IN_USE,
                                   f"{DAD_ATTEMPTS} addresses in a row were already in use on "
                                   "the wire", note) from None
                alloc = self._allocate(req)
        return cni.build_result(
            ifname=req.ifname, mac=alloc["mac"], sandbox=req.netns,
            host_ifname=att.host_ifname, address=alloc["address"],
            gateway=alloc.get("gateway"), routes=self._routes(alloc),
            dns=alloc.get("dns") or {})

    # --- DEL ------------------------------------------------------------------

    def delete(self, req: CniRequest) -> dict[str, Any]:
        key = (req.network, req.container_id, req.ifname)
        with self._locked(key):
            att = self.state.get(*key)
            if att is None:
                att = Attachment(
                    network=req.network, container_id=req.container_id, ifname=req.ifname,
                    plugin=req.plugin, state="deleting", netns=req.netns or "", pool=req.pool,
                    host_ifname=None if req.plugin == "netd-ipam"
                    else host_ifname_for(req.container_id, req.ifname),
                )
            self._undo(att, "DEL")
        return {}

    def _undo(self, att: Attachment, why: str, *, ipam_down: bool = False) -> None:
        """Remove an attachment's plumbing and release its address (queued if need be)."""
        if att.state != "deleting":
            att.state = "deleting"
            self.state.put(att)
        if att.host_ifname:
            self.dp.remove(att.host_ifname, att.netns or None, att.ifname)
        self._release(att.pool, att.container_id, att.ifname, att.ip, why, queue=ipam_down)
        self.state.delete(*att.key)

    def _release(self, pool: str, container_id: str, ifname: str, ip: str | None,
                 why: str, *, queue: bool = False) -> None:
        if queue:
            log.warning("IPAM unreachable; release of %s/%s queued (%s)", container_id, ifname,
                        why)
            self.state.queue_release(pool, container_id, ifname, ip, "IPAM unreachable")
            return
        try:
            self.release_ipam.release(pool=pool, container_id=container_id, ifname=ifname)
        except Unavailable as exc:
            log.warning("IPAM unreachable; release of %s/%s queued (%s)", container_id, ifname,
                        why)
            self.state.queue_release(pool, container_id, ifname, ip, exc.message)
        except PoolNotFound:
            pass  # the pool is gone, and its addresses with it

    def flush_releases(self) -> int:
        """Send queued releases; returns how many are still waiting.

        Each is sent under its owner's lock and only if still queued and the
        owner is not attached again: a retried ADD owns the address now.
        """
        waiting = 0
        for p in self.state.pending():
            with self._locked(("", p.container_id, p.ifname)):
                if self.state.pending_release(p.id) is None:
                    continue
                if any(a.container_id == p.container_id and a.ifname == p.ifname
                       for a in self.state.all()):
                    log.info("queued release of %s/%s dropped: attached again",
                             p.container_id, p.ifname)
                    self.state.release_done(p.id)
                    continue
                try:
                    self.release_ipam.release(pool=p.pool, container_id=p.container_id,
                                              ifname=p.ifname)
                except Unavailable as exc:
                    self.state.release_failed(p.id, exc.message)
                    waiting += 1
                    continue
                except NetdError as exc:
                    log.warning("dropping queued release of %s/%s: %s", p.container_id,
                                p.ifname, exc)
                self.state.release_done(p.id)
                log.info("queued release of %s/%s sent", p.container_id, p.ifname)
        return waiting

    # --- CHECK ----------------------------------------------------------------

    def check(self, req: CniRequest) -> dict[str, Any]:
        att = self.state.get(req.network, req.container_id, req.ifname)
        if att is None or att.state != "ready":
            raise CniError(cni.CHECK_FAILED,
                           f"no attachment of {req.container_id}/{req.ifname} on network "
                           f"{req.network!r} on host {self.cfg.host}")
        if not self.dp.netns_exists(req.netns):
            raise CniError(cni.UNKNOWN_CONTAINER, f"network namespace {req.netns} does not exist")
        problems = cni.compare_prev_result(req.prev_result, att.result)
        if att.host_ifname:
            problems += self.dp.check(self._plumbing(att, self._stored_alloc(att),
                                                     att.host_ifname))
        state = self.ipam.show(att.ip or "")
        if state.get("state") != "allocated" or state.get("container_id") != att.container_id:
            problems.append(f"the IPAM no longer records {att.ip} for {att.container_id}"
                            f" (it is {state.get('state')})")
        if problems:
            raise CniError(cni.CHECK_FAILED, "; ".join(problems))
        return {}

    @staticmethod
    def _stored_alloc(att: Attachment) -> dict[str, Any]:
        """Rebuild what plumbing needs from the stored result."""
        ips = att.result.get("ips") or [{}]
        routes = att.result.get("routes") or []
        gw = ips[0].get("gateway")
        default = {"0.0.0.0/0", "::/0"}
        return {
            "ip": att.ip, "mac": att.mac, "address": ips[0].get("address"), "gateway": gw,
            "routes": [r for r in routes if r.get("dst") not in default],
        }

    # --- GC and STATUS ----------------------------------------------------------

    def gc(self, req: CniRequest) -> dict[str, Any]:
        valid = set(req.valid_attachments)
        removed = 0
        for att in self.state.all(req.network):
            if (att.container_id, att.ifname) not in valid:
                with self._locked(att.key):
                    self._undo(att, "GC")
                removed += 1
        # leaks: addresses the IPAM holds for this host and network with no record here
        known = {(a.container_id, a.ifname) for a in self.state.all(req.network)} | valid
        try:
            held = self.ipam.addresses(host=self.cfg.host, limit=100000)["addresses"]
        except Unavailable as exc:
            raise CniError(cni.TRY_AGAIN_LATER, "try again later: IPAM unreachable",
                           exc.message) from None
        for a in held:
            if (a.get("labels") or {}).get("netd.network") != req.network:
                continue
            if (a["container_id"], a["ifname"]) not in known:
                self._release(a["pool"], a["container_id"], a["ifname"], a["ip"], "GC leak")
                removed += 1
        if removed:
            log.info("GC of network %s removed %d stale attachment(s)", req.network, removed)
        return {}

    def cni_status(self, req: CniRequest) -> dict[str, Any]:
        try:
            self.ipam.health()
            pool = self.ipam.get_pool(req.pool)
        except Unavailable as exc:
            raise CniError(cni.PLUGIN_NOT_AVAILABLE, "the IPAM is unreachable",
                           exc.message) from None
        except PoolNotFound as exc:
            raise CniError(cni.PLUGIN_NOT_AVAILABLE, exc.message) from None
        if int(pool.get("free", 0)) <= 0:
            raise CniError(cni.PLUGIN_NOT_AVAILABLE,
                           f"pool {req.pool!r} has no free address")
        return {}

    # --- lifecycle ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        atts = self.state.all()
        try:
            self.ipam.health()
            ipam_ok = True
        except NetdError:
            ipam_ok = False
        return {
            "host": self.cfg.host, "mode": self.cfg.mode, "ipam_url": self.cfg.ipam_url,
            "ipam_reachable": ipam_ok, "uptime": round(self.clock() - self.started, 1),
            "attachments": [
                {"network": a.network, "container_id": a.container_id, "ifname": a.ifname,
                 "plugin": a.plugin, "state": a.state, "ip": a.ip, "mac": a.mac,
                 "host_ifname": a.host_ifname, "netns": a.netns} for a in atts],
            "docker_plugin": self.cfg.docker_plugin,
            "docker_endpoints": self._docker_endpoints(),
            "pending_releases": len(self.state.pending()),
            "repaired_at_start": self.repaired,
        }

    def _docker_endpoints(self) -> list[dict[str, Any]]:
        """The Docker driver's endpoints (its tables in the same state store), when kept."""
        endpoints = getattr(self.state, "docker_endpoints", None)
        if endpoints is None:
            return []
        return [
            {"plugin": "docker", "network_id": e.network_id, "endpoint_id": e.endpoint_id,
             "container_name": e.container_name, "pool": e.pool, "state": e.state,
             "ip": e.ip or None, "mac": e.mac or None, "host_ifname": e.host_ifname,
             "sandbox": e.sandbox} for e in endpoints()]

    def reconcile(self) -> list[str]:
        """Finish or undo what a crash interrupted; keep live attachments working.

        Orphaned host interfaces carrying netd's mark are swept only after
        every record has been looked at.
        """
        done: list[str] = []
        for att in self.state.all():
            what = f"{att.container_id[:12]}/{att.ifname} ({att.ip})"
            if att.state != "ready":
                interrupted = att.state  # _undo sets it to "deleting"
                self._undo(att, "interrupted " + interrupted)
                done.append(f"undid interrupted {interrupted.upper()} of {what}")
            elif not self.dp.netns_exists(att.netns):
                self._undo(att, "container gone")
                done.append(f"removed {what}: its network namespace is gone")
            elif att.host_ifname:
                p = self._plumbing(att, self._stored_alloc(att), att.host_ifname)
                if self.dp.repair(p):
                    done.append(f"repaired plumbing of {what}")
        keep = {a.host_ifname for a in self.state.all() if a.host_ifname}
        for name in self.dp.owned_links():
            if name not in keep:
                self.dp.remove(name, None, None)
                done.append(f"removed orphaned interface {name}")
        for line in done:
            log.info("reconcile: %s", line)
        self.repaired = done
        return done
