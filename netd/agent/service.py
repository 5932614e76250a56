"""The host agent's endpoint pipeline: request -> IPAM -> dataplane driver -> record.

:class:`Agent` is what every integration drives (the CNI plugins through
:mod:`netd.cni.handler`, Docker through :mod:`netd.cni.docker_driver`): the
same owner locks, the same record written before anything is made, the same
duplicate-address handling, the same release-or-queue and the same
reconciliation, whatever the mode (its driver) and whoever asked.

It keeps its own record of what it plumbed (:mod:`netd.agent.state`), so that
a crash at any moment is repaired by :meth:`Agent.reconcile` on the next
start; that record is a cache of what the kernel's marks and the IPAM know,
and a lost one is rebuilt from them (adoption), never taken as "nothing here".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from netd.agent.config import AgentConfig
from netd.agent.errors import DuplicateAddress, InterfaceInUse, NotAttached
from netd.agent.locks import Owner, OwnerLocks
from netd.agent.metrics import AgentMetrics
from netd.agent.state import Attachment, StateStore
from netd.dataplane.driver import Addressing, Driver, Endpoint, Owned, Prepared
from netd.dataplane.errors import AddressConflict
from netd.dataplane.netns import check_container_netns, netns_exists
from netd.dataplane.veth import host_ifname_for, peer_ifname_for
from netd.errors import AddressInUse, NetdError, PoolNotFound, Unauthorized, Unavailable
from netd.ipam.client import IpamApi, all_addresses

log = logging.getLogger("netd.agent")

DAD_ATTEMPTS = 3
POOL_CACHE_SECONDS = 30.0  # how long an ADD trusts a pool document it fetched
PLUGIN_LABEL = "netd.plugin"
NETWORK_LABEL = "netd.network"


@dataclass(frozen=True)
class EndpointRequest:
    """One ADD, whoever asked: the owner, where it lives, and what the IPAM is asked for.

    ``netns`` None hands the container end over to a runtime that moves it
    (Docker). ``plumb`` False asks for an address only (the ``netd-ipam``
    plugin). ``adopt_from`` takes over the address another (provisional)
    owner holds instead of allocating one (Docker's ``RequestAddress``).
    ``extra`` is the integration's own data, kept with the record.
    """

    network: str
    container_id: str
    ifname: str
    pool: str
    plugin: str
    netns: str | None
    plumb: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)
    handle: str | None = None
    ip: str | None = None
    mac: str | None = None
    adopt_from: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def owner(self) -> Owner:
        return (self.container_id, self.ifname)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.network, self.container_id, self.ifname)


def addressing_of(alloc: Mapping[str, Any]) -> Addressing:
    """The IPAM's allocation document -> what a driver is asked to configure."""
    routes = tuple((str(r["dst"]), r.get("gw")) for r in alloc.get("routes") or [])
    return Addressing(str(alloc["address"]), str(alloc["mac"]), alloc.get("gateway"), routes,
                      alloc.get("vlan"), allowed=tuple(str(a) for a in alloc.get("allowed") or ()))


class _Recorded(Collection[str]):
    """The host interfaces the agent has records of, read afresh at each question.

    The sweep asks about each candidate under the candidate's owner lock, so
    an ADD that records its interface meanwhile is seen.
    """

    def __init__(self, state: StateStore) -> None:
        self.state = state

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.state.by_host_ifname(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter([a.host_ifname for a in self.state.all() if a.host_ifname])

    def __len__(self) -> int:
        return len(list(iter(self)))


class Agent:
    """One host's agent. Receives its collaborators; starts nothing by itself."""

    def __init__(self, cfg: AgentConfig, ipam: IpamApi, driver: Driver, state: StateStore, *,
                 release_ipam: IpamApi | None = None, clock: Callable[[], float] = time.time,
                 netns_exists: Callable[[str], bool] = netns_exists,
                 check_netns: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.netns_exists = netns_exists
        # what ADD and CHECK are given must be a container's namespace, never the host's
        self.check_netns: Callable[[str], None] = check_netns or (
            lambda netns: check_container_netns(netns, driver.host_netns))
        self.ipam = ipam
        # DEL must never hang on the network: a client with a short timeout
        self.release_ipam = release_ipam or ipam
        self.driver = driver
        self.state = state
        #: Prometheus metrics (netd.agent.metrics.AgentMetrics) when they are on
        self.metrics: AgentMetrics | None = None
        self.clock = clock
        self.locks = OwnerLocks()
        # the driver's prepare() of each ADD runs here, next to its IPAM call
        self._background = ThreadPoolExecutor(max_workers=32,
                                              thread_name_prefix="netd-prepare")
        self._reconciling = threading.Lock()
        self.started = clock()
        self.repaired: list[str] = []
        self.failed: dict[tuple[str, str, str], str] = {}  # records reconcile left, and why
        self.reconciled = False  # the first full pass (with the sweep) is done
        self._pools: dict[str, tuple[float, Mapping[str, Any]]] = {}

    def close(self) -> None:
        self._background.shutdown(wait=False)

    # --- ADD ----------------------------------------------------------------------------

    def add(self, req: EndpointRequest) -> Attachment:
        """Attach (idempotently) and return the ready record.

        An owner attached on another network is refused (:class:`InterfaceInUse`):
        one (container id, ifname) is one interface and one IPAM owner. A
        failed ADD leaves nothing: no interface, no allocation (its release is
        queued when the IPAM is unreachable).
        """
        with self.locks.hold(req.owner):
            others = [a for a in self.state.of_owner(*req.owner) if a.network != req.network]
            if others:
                o = others[0]
                raise InterfaceInUse(
                    f"container {req.container_id[:12]} already has {req.ifname} on network "
                    f"{o.network!r}" + (f" (host interface {o.host_ifname})"
                                        if o.host_ifname else "")
                    + f"; give this network's interface another name than {req.ifname}")
            existing = self.state.get(*req.key)
            if existing is not None:
                if (existing.state == "ready" and existing.netns == req.netns
                        and existing.pool == req.pool):
                    return existing
                self._undo(existing, "replaced by a new ADD")
            if req.netns is not None:
                self.check_netns(req.netns)  # a container's, not the host's own
            if req.plumb and self.driver.checks_pools:
                self.driver.check_pool(self._pool(req.pool))  # before anything is made
            # A release queued by an earlier failed attempt of this owner must not
            # free what this ADD is about to get (the IPAM answers an owner's retry
            # with the address it already holds).
            if self.state.drop_releases(*req.owner):
                log.info("ADD %s/%s: dropped its queued release", *req.owner)
            att = Attachment(
                network=req.network, container_id=req.container_id, ifname=req.ifname,
                plugin=req.plugin, state="adding", netns=req.netns, pool=req.pool,
                host_ifname=host_ifname_for(*req.owner) if req.plumb else None,
                peer_ifname=(peer_ifname_for(*req.owner) if req.plumb and req.netns is None
                             else None),
                mode=self.driver.mode if req.plumb else "", extra=dict(req.extra))
            self.state.put(att)  # before anything exists, so a crash can be undone
            try:
                self._add(req, att)
            except BaseException as exc:
                log.warning("ADD %s/%s failed, undoing: %s", req.container_id[:12], req.ifname,
                            exc)
                # IPAM unreachable: queue the release at once instead of waiting for
                # another timeout, so that the ADD fails fast
                self._undo(att, "failed ADD", ipam_down=isinstance(exc, Unavailable))
                raise
            att.state = "ready"
            self.state.put(att)
            return att

    def _add(self, req: EndpointRequest, att: Attachment) -> None:
        ep = att.endpoint()
        if ep is not None and self.driver.checks_pools:  # the pool is cached by now
            ep = replace(ep, vlan=self._pool(req.pool).get("vlan"))
        # the interface needs no address: the driver makes it while the IPAM allocates
        preparing = self._background.submit(self.driver.prepare, ep) if ep else None
        try:
            alloc = self._address(req)
        except BaseException:
            self._discard(preparing)  # made or not, it is settled before the undo
            raise
        self._take(att, alloc)
        addressing = addressing_of(alloc)
        if self.driver.follows_blocks and not self.driver.covers(str(alloc["ip"])):
            self.sync_quietly()  # a new block of this host: its blackhole now
        if ep is None:  # the address alone
            att.address, att.gateway = addressing.address, addressing.gateway
            att.routes, att.vlan = list(addressing.all_routes()), addressing.vlan
            return
        prepared: Prepared | None = preparing.result() if preparing is not None else None
        for attempt in range(DAD_ATTEMPTS):
            try:
                attached = self.driver.attach(ep, addressing, prepared)
                break
            except AddressConflict as exc:
                prepared = None  # attach consumed it; the next attempt makes a new veth
                note = self._duplicate(req, exc)
                if req.ip or req.adopt_from:
                    raise DuplicateAddress(f"{exc.ip} is already used on the wire by "
                                           f"{exc.mac}; it is now reserved ({note})") from None
                if attempt == DAD_ATTEMPTS - 1:
                    raise DuplicateAddress(f"{DAD_ATTEMPTS} addresses in a row were already "
                                           f"in use on the wire (last: {note})") from None
                alloc = self._address(req)
                self._take(att, alloc)
                addressing = addressing_of(alloc)
        att.record(attached)

    @staticmethod
    def _take(att: Attachment, alloc: Mapping[str, Any]) -> None:
        att.ip, att.mac = str(alloc["ip"]), str(alloc["mac"])
        att.dns = dict(alloc.get("dns") or {})

    def sync_quietly(self) -> None:
        """:meth:`sync_blocks`, logging instead of raising (the next pass tries again)."""
        try:
            self.sync_blocks()
        except NetdError as exc:
            log.warning("sync of this host's blocks failed: %s", exc.message)

    def check_pool(self, pool: Mapping[str, Any]) -> None:
        """Refuse a pool the mode cannot serve (:class:`PoolNotUsable`): for a Docker
        network at its creation rather than at its first container."""
        if self.driver.checks_pools:
            self.driver.check_pool(pool)

    def _pool(self, name: str) -> Mapping[str, Any]:
        """The IPAM's pool document, cached for :data:`POOL_CACHE_SECONDS` (a pool's VLAN
        does not change)."""
        now = self.clock()
        cached = self._pools.get(name)
        if cached is not None and now - cached[0] < POOL_CACHE_SECONDS:
            return cached[1]
        pool = dict(self.ipam.get_pool(name))
        self._pools[name] = (now, pool)
        return pool

    def _address(self, req: EndpointRequest) -> dict[str, Any]:
        """Allocate for the owner, or take over what ``adopt_from`` holds."""
        if req.adopt_from and req.ip:
            try:
                return self.ipam.update(req.ip, req.adopt_from, ifname=req.ifname,
                                        new_container_id=req.container_id,
                                        labels=dict(req.labels))
            except AddressInUse:
                # a retry: the owner took it over already
                return self.ipam.update(req.ip, req.container_id, ifname=req.ifname,
                                        labels=dict(req.labels))
        return self.ipam.allocate(req.pool, req.container_id, req.ifname, host=self.cfg.host,
                                  netns=req.netns or "", labels=dict(req.labels), ip=req.ip,
                                  mac=req.mac, handle=req.handle)

    def _duplicate(self, req: EndpointRequest, exc: AddressConflict) -> str:
        """Someone on the wire uses this address: give it back and reserve it, noting who."""
        if self.metrics is not None:
            self.metrics.duplicates.labels(self.driver.mode).inc()
        note = f"duplicate: answered ARP from {exc.mac} (seen by {self.cfg.host})"
        log.warning("%s is in use on the wire by %s; reserving it", exc.ip, exc.mac)
        self.ipam.release(pool=req.pool, container_id=req.container_id, ifname=req.ifname)
        try:
            self.ipam.reserve(req.pool, exc.ip, note=note)
        except NetdError as err:
            log.warning("could not reserve duplicate %s: %s", exc.ip, err)
        return note

    @staticmethod
    def _discard(preparing: Future[Prepared | None] | None) -> None:
        if preparing is None:
            return
        try:
            made = preparing.result()
            if made is not None:
                made.close()
        except Exception as exc:  # the ADD fails anyway; the undo removes what is there
            log.debug("preparing the interface failed too: %s", exc)

    # --- DEL ------------------------------------------------------------------------------

    def delete(self, network: str, container_id: str, ifname: str, *, pool: str = "",
               plugin: str = "netd-cni", netns: str | None = None) -> None:
        """Remove the endpoint and release its address; success when nothing is there.

        Without a record of this network the agent touches only what provably
        is this owner's: nothing when the owner is attached on another network
        (that attachment is not this DEL's), else an interface carrying this
        owner's mark in the driver's scope, and the owner's address in ``pool``.
        """
        with self.locks.hold((container_id, ifname)):
            att = self.state.get(network, container_id, ifname)
            if att is not None:
                self._undo(att, "DEL")
                return
            others = self.state.of_owner(container_id, ifname)
            if others:
                log.info("DEL %s/%s on %s: attached on network %s, not this one; nothing to do",
                         container_id[:12], ifname, network, others[0].network)
                return
            if plugin != "netd-ipam":
                ep = Endpoint(container_id, ifname, netns, host_ifname_for(container_id, ifname))
                self.driver.detach(ep, owner_only=True)
            if pool:
                self._release(pool, container_id, ifname, None, "DEL")

    def _undo(self, att: Attachment, why: str, *, ipam_down: bool = False) -> None:
        """Remove an attachment's plumbing and release its address (queued if need be)."""
        if att.state != "deleting":
            att.state = "deleting"
            self.state.put(att)
        ep = att.endpoint()
        if ep is not None:
            self.driver.detach(ep)
        self._release(att.pool, att.container_id, att.ifname, att.ip, why, queue=ipam_down)
        self.state.delete(*att.key)

    def release(self, pool: str, container_id: str, ifname: str, ip: str | None,
                why: str) -> None:
        """Release an address the agent holds outside an attachment (Docker's provisional
        holds), under the owner's lock; queued when the IPAM is unreachable."""
        with self.locks.hold((container_id, ifname)):
            self._release(pool, container_id, ifname, ip, why)

    def _release(self, pool: str, container_id: str, ifname: str, ip: str | None,
                 why: str, *, queue: bool = False) -> None:
        """Release by owner, or queue the release when the IPAM is unreachable."""
        if not queue:
            try:
                self.release_ipam.release(pool=pool, container_id=container_id, ifname=ifname)
                return
            except (Unavailable, Unauthorized) as exc:  # may heal: the IPAM, the token
                error = exc.message
            except PoolNotFound:
                return  # the pool is gone, and its addresses with it
            except NetdError as exc:
                # a permanent refusal (the IPAM will never take this release): it must
                # not wedge the DEL or the reconcile that asked; the IPAM's GC finds
                # whatever it still holds
                log.warning("the IPAM refuses to release %s/%s in pool %s (%s): %s; "
                            "going on", container_id[:16], ifname, pool, why, exc.message)
                return
        else:
            error = "IPAM unreachable"
        log.warning("IPAM unreachable; release of %s/%s queued (%s)", container_id[:16], ifname,
                    why)
        self.state.queue_release(pool, container_id, ifname, ip, error)

    def flush_releases(self) -> int:
        """Send queued releases; returns how many are still waiting.

        Each is sent under its owner's lock and only if still queued and the
        owner is not attached again: a retried ADD owns the address now.
        """
        waiting = 0
        for p in self.state.pending():
            with self.locks.hold((p.container_id, p.ifname)):
                if self.state.pending_release(p.id) is None:
                    continue
                if self.state.of_owner(p.container_id, p.ifname):
                    log.info("queued release of %s/%s dropped: attached again",
                             p.container_id[:16], p.ifname)
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
                    log.warning("dropping queued release of %s/%s: %s", p.container_id[:16],
                                p.ifname, exc)
                self.state.release_done(p.id)
                log.info("queued release of %s/%s sent", p.container_id[:16], p.ifname)
        return waiting

    # --- CHECK ------------------------------------------------------------------------------

    def check(self, network: str, container_id: str, ifname: str,
              netns: str | None = None) -> tuple[Attachment, list[str]]:
        """The ready record and what is wrong with it (kernel and IPAM); raises
        :class:`NotAttached` or :class:`NetnsNotFound`."""
        with self.locks.hold((container_id, ifname)):
            att = self.state.get(network, container_id, ifname)
            if att is None or att.state != "ready":
                raise NotAttached(f"no attachment of {container_id}/{ifname} on network "
                                  f"{network!r} on host {self.cfg.host}")
            if netns is not None:
                self.check_netns(netns)
            problems: list[str] = []
            ep, attached = att.endpoint(), att.attached()
            if ep is not None and attached is not None:
                problems += self.driver.check(ep, attached)
            shown = self.ipam.show(att.ip or "")
            if shown.get("state") != "allocated" or shown.get("container_id") != container_id:
                problems.append(f"the IPAM no longer records {att.ip} for {container_id}"
                                f" (it is {shown.get('state')})")
            return att, problems

    # --- GC -----------------------------------------------------------------------------------

    def gc(self, network: str, valid: Collection[Owner]) -> int:
        """Remove every attachment of ``network`` not in ``valid``, and its leaked addresses.

        Never what an ADD holds: attachments that were still being added when
        the GC began (the runtime's list may predate them) or were made since
        are kept, each candidate is looked at again under its owner's lock,
        and addresses of owners with a record are kept.
        """
        began = self.clock()
        keep = set(valid)
        removed = 0
        for att in self.state.all(network):  # the snapshot when the GC began
            if att.owner in keep or att.state == "adding":
                continue
            with self.locks.hold(att.owner):
                cur = self.state.get(*att.key)
                if cur is None or cur.state == "adding" or cur.created >= began:
                    continue
                self._undo(cur, "GC")
                removed += 1
        held = all_addresses(self.ipam, host=self.cfg.host)
        for a in held:
            owner = (str(a["container_id"]), str(a["ifname"]))
            if (a.get("labels") or {}).get(NETWORK_LABEL) != network or owner in keep:
                continue
            with self.locks.hold(owner):
                if self.state.of_owner(*owner):
                    continue  # an ADD made it meanwhile, or another network holds it
                if float(a.get("created") or 0) >= began:
                    continue
                self._release(str(a["pool"]), owner[0], owner[1], str(a["ip"]), "GC leak")
                removed += 1
        if removed:
            log.info("GC of network %s removed %d stale attachment(s)", network, removed)
        return removed

    # --- reconcile ------------------------------------------------------------------------------

    def reconcile(self, *, sweep: bool = True) -> list[str]:
        """Finish or undo what a crash interrupted; keep live attachments working.

        Each record is looked at alone, under its owner's lock: one that cannot
        be repaired yet is logged and kept for the next pass (:attr:`failed`),
        and the others go on. With ``sweep`` (the first pass, before serving),
        the driver's marked objects without a record are then adopted when the
        IPAM agrees they are live attachments of this host, and the remaining
        ones of the driver's scope are removed.
        """
        with self._reconciling:
            done: list[str] = []
            failed: dict[tuple[str, str, str], str] = {}
            for att in self.state.all():
                try:
                    with self.locks.hold(att.owner):
                        cur = self.state.get(*att.key)
                        if cur is not None:
                            done += self._reconcile_one(cur)
                except Exception as exc:
                    log.exception("reconcile of %s/%s on %s failed; kept for the next pass",
                                  att.container_id[:12], att.ifname, att.network)
                    failed[att.key] = f"{type(exc).__name__}: {exc}"
            if sweep:
                try:
                    done += self._adopt_and_sweep()
                    self.reconciled = True
                except Exception as exc:
                    log.exception("reconcile: the sweep of unrecorded objects failed; "
                                  "nothing was swept")
                    failed[("", "", "sweep")] = f"{type(exc).__name__}: {exc}"
            for line in done:
                log.info("reconcile: %s", line)
            if self.metrics is not None and done:
                self.metrics.repairs.labels(self.driver.mode).inc(len(done))
            self.failed = failed
            if sweep:
                self.repaired = done
            return done

    def _reconcile_one(self, att: Attachment) -> list[str]:
        what = f"{att.container_id[:12]}/{att.ifname} ({att.ip})"
        if att.state != "ready":
            interrupted = att.state  # _undo sets it to "deleting"
            self._undo(att, "interrupted " + interrupted)
            return [f"undid interrupted {interrupted.upper()} of {what}"]
        if att.netns is not None and not self.netns_exists(att.netns):
            self._undo(att, "container gone")
            return [f"removed {what}: its network namespace is gone"]
        ep, attached = att.endpoint(), att.attached()
        if (ep is not None and attached is not None and att.mode == self.driver.mode
                and self.driver.repair(ep, attached)):
            return [f"repaired the plumbing of {what}"]
        return []

    def _adopt_and_sweep(self) -> list[str]:
        done: list[str] = []
        recorded = {a.host_ifname for a in self.state.all() if a.host_ifname}
        unknown = [o for o in self.driver.owned() if o.host_ifname not in recorded]
        if unknown:
            # the kernel's marks and the IPAM outrank this cache: never sweep blind
            held = all_addresses(self.ipam, host=self.cfg.host)
            by_owner = {(str(a["container_id"]), str(a["ifname"])): a for a in held}
            for o in unknown:
                with self.locks.hold(o.owner):
                    if self.state.of_owner(*o.owner):
                        continue
                    alloc = by_owner.get(o.owner)
                    if alloc is not None:
                        line = self._adopt(o, alloc)
                        if line:
                            done.append(line)
        done += self.driver.sweep(_Recorded(self.state), hold=self.locks.hold)
        return done

    def _adopt(self, o: Owned, alloc: Mapping[str, Any]) -> str | None:
        """Take an unrecorded live endpoint back (its record was lost); None: not live.

        The IPAM says who it is (pool, address, MAC, network, namespace); the
        kernel's mark says it is this driver's. A container whose namespace is
        gone is removed and its address released, as for a recorded one.
        """
        labels = alloc.get("labels") or {}
        docker = labels.get(PLUGIN_LABEL) == "docker"
        netns = None if docker else (str(alloc.get("netns") or "") or None)
        what = f"{o.mark.container_id[:12]}/{o.mark.ifname} ({alloc['ip']})"
        network = str(labels.get(NETWORK_LABEL) or "")
        if not network or (not docker and netns is None):
            return None  # not enough to rebuild the record: the sweep decides
        if netns is not None and not self.netns_exists(netns):
            self.driver.detach(Endpoint(o.mark.container_id, o.mark.ifname, netns,
                                        o.host_ifname))
            self._release(str(alloc["pool"]), o.mark.container_id, o.mark.ifname,
                          str(alloc["ip"]), "container gone")
            return f"removed unrecorded {what}: its network namespace is gone"
        ep = Endpoint(o.mark.container_id, o.mark.ifname, netns, o.host_ifname,
                      peer_ifname_for(*o.owner) if netns is None else None)
        attached = self.driver.expected(ep, addressing_of(alloc))
        att = Attachment(
            network=network, container_id=o.mark.container_id, ifname=o.mark.ifname,
            plugin="docker" if docker else "netd-cni", state="ready", netns=netns,
            pool=str(alloc["pool"]), host_ifname=o.host_ifname, peer_ifname=ep.peer_ifname,
            ip=str(alloc["ip"]), mac=str(alloc["mac"]), dns=dict(alloc.get("dns") or {}),
            mode=self.driver.mode,
            extra={"container_name": labels.get("container_name", "")} if docker else {})
        att.record(attached)
        self.state.put(att)
        try:
            if self.driver.repair(ep, att.attached() or attached):
                return f"adopted {what} (its record was lost) and repaired it"
        except NetdError as exc:
            log.warning("adopted %s but could not repair it yet: %s", what, exc)
        return f"adopted {what}: its record was lost, the kernel and the IPAM agree"

    # --- following the IPAM ------------------------------------------------------------------

    def sync_allowed(self) -> list[str]:
        """Follow the allowed extra addresses the IPAM holds for this host's attachments.

        An operator allows a VRRP address for a running container (``netctl ip
        allow``); the driver's port guard takes it in at the next pass. One
        listing of this host's allocations per pass.
        """
        held = {(str(a["container_id"]), str(a["ifname"])): a
                for a in all_addresses(self.ipam, host=self.cfg.host)}
        done = []
        for att in self.state.all():
            alloc = held.get(att.owner)
            if (att.state != "ready" or not att.host_ifname or alloc is None
                    or alloc.get("ip") != att.ip):
                continue
            wanted = [str(a) for a in alloc.get("allowed") or []]
            if wanted == att.allowed:
                continue
            with self.locks.hold(att.owner):
                cur = self.state.get(*att.key)
                if cur is None or cur.state != "ready" or cur.allowed == wanted:
                    continue
                ep, attached = cur.endpoint(), cur.attached()
                if ep is None or attached is None:
                    continue
                attached = replace(attached, allowed=tuple(wanted))
                self.driver.repair(ep, attached)
                cur.allowed = wanted
                self.state.put(cur)
                done.append(f"{cur.container_id[:12]}/{cur.ifname} ({cur.ip}) may also send "
                            f"from: {', '.join(wanted) or 'nothing'}")
        for line in done:
            log.info("sync: %s", line)
        return done

    def sync_blocks(self) -> list[str]:
        """Follow the IPAM blocks of this host (the BGP mode's blackholes): one listing."""
        if not self.driver.follows_blocks:
            return []
        doc = self.ipam.blocks(host=self.cfg.host)
        done = self.driver.sync_blocks(sorted({str(b["cidr"]) for b in doc.get("blocks", [])
                                               if b.get("host") == self.cfg.host}))
        for line in done:
            log.info("sync: %s", line)
        return done

    def sync(self) -> list[str]:
        """What the agent follows from the IPAM while serving (every ``sync_interval``)."""
        return [*self.sync_blocks(), *self.sync_allowed()]

    # --- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        atts = self.state.all()
        try:
            self.ipam.health()
            ipam_ok = True
        except NetdError:
            ipam_ok = False
        return {
            "host": self.cfg.host, "mode": self.driver.mode, "ipam_url": self.cfg.ipam_url,
            "ipam_reachable": ipam_ok, "uptime": round(self.clock() - self.started, 1),
            "attachments": [
                {"network": a.network, "container_id": a.container_id, "ifname": a.ifname,
                 "plugin": a.plugin, "state": a.state, "ip": a.ip, "mac": a.mac,
                 "host_ifname": a.host_ifname, "netns": a.netns, "mode": a.mode,
                 "mtu": a.mtu or None, "vlan": a.vlan,
                 "name": str(a.extra.get("container_name") or "")} for a in atts],
            "docker_plugin": self.cfg.docker_plugin,
            "pending_releases": len(self.state.pending()),
            "repaired_at_start": self.repaired,
            "not_reconciled": [{"network": k[0], "container_id": k[1], "ifname": k[2],
                                "error": why} for k, why in self.failed.items()],
            "driver": self._driver_status(),
        }

    def metrics_snapshot(self) -> dict[str, Any]:
        """What the metrics' gauges show, read at scrape time."""
        states: dict[str, int] = {}
        for a in self.state.all():
            states[a.state] = states.get(a.state, 0) + 1
        try:
            self.ipam.health()
            ipam_ok = True
        except NetdError:
            ipam_ok = False
        status = self._driver_status()
        try:
            gauges = self.driver.gauges(status)
        except NetdError:
            gauges = []
        return {"attachments": states, "queued_releases": len(self.state.pending()),
                "ipam_ok": ipam_ok, "gauges": gauges}

    def _driver_status(self) -> dict[str, Any]:
        try:
            return dict(self.driver.status())
        except NetdError as exc:  # the status must answer even when the mode is unwell
            return {"error": exc.message}


__all__ = ["Agent", "EndpointRequest", "addressing_of"]
