"""etcd v3 over gRPC: endpoints, deadlines, retries, and optimistic transactions.

The wire is etcd's own protobuf API (the generated messages and stubs that
ship with ``aetcd``) on synchronous gRPC channels, one per endpoint: the IPAM
service is synchronous code that FastAPI runs in worker threads, so nothing
here blocks an event loop. Every call has a deadline; an endpoint that fails
(UNAVAILABLE, a deadline) is left at once for the one that failed longest ago,
with a bounded backoff only after every endpoint failed in turn, until the
call's overall budget is spent (:class:`~netd.errors.Unavailable`).

:class:`Stm` is one optimistic transaction (etcd's "software transactional
memory", as Calico's IPAM uses compare-and-swap on its blocks): reads at one
revision, writes buffered, and one etcd ``Txn`` at the end that compares the
``mod_revision`` of every key it read (0: it was absent, so it is created only
when still absent) and that no key appeared in or changed within the ranges
it listed. If anything moved, the whole change runs again on fresh reads. A
commit whose answer was lost (a deadline, a dead member) is also run again:
its own earlier writes then show in the reads, so an allocation that did
commit is found and returned, never made twice.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from aetcd import rpc

from netd.errors import InvalidInput, Unavailable

log = logging.getLogger("netd.ipam.etcd")

T = TypeVar("T")

#: gRPC codes after which another endpoint (or a later try) may succeed
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}
#: etcd's own transient errors (sent as UNKNOWN or UNAVAILABLE, told apart by text);
#: "context deadline exceeded" is the member's side of our deadline, which can arrive
#: before the client's own DEADLINE_EXCEEDED (seen as a 503 after a leader kill)
TRANSIENT_TEXT = ("leader changed", "no leader", "timed out", "too many requests",
                  "not capable", "stopped", "unhealthy cluster", "deadline exceeded",
                  "context canceled", "proposal dropped")


#: etcd's answers when authentication is on and the credentials are missing or wrong
AUTH_TEXT = ("user name is empty", "authentication failed", "permission denied",
             "user name not found")


class Retry(Exception):
    """This try failed in a way a new try may not: run the change again."""


class Conflict(Retry):
    """What the transaction read changed before it committed."""


@dataclass(frozen=True)
class Tls:
    ca: bytes | None
    cert: bytes | None
    key: bytes | None


@dataclass(frozen=True)
class Kv:
    """One key as read: its value and revisions."""

    key: bytes
    value: bytes
    mod: int
    create: int
    lease: int = 0


@dataclass(frozen=True)
class RangeResult:
    kvs: list[Kv]
    revision: int
    more: bool
    count: int


def prefix_end(prefix: bytes) -> bytes:
    """The end of the range of keys that start with ``prefix``."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[:i + 1])
    return b"\0"


class Stubs:
    """One endpoint's channel and the etcd services on it."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.kv = rpc.KVStub(channel)
        self.lease = rpc.LeaseStub(channel)
        self.maintenance = rpc.MaintenanceStub(channel)
        self.auth = rpc.AuthStub(channel)
        self.watch = rpc.WatchStub(channel)


class EtcdClient:
    """Endpoints of one etcd cluster; thread-safe; every call with a deadline."""

    def __init__(self, endpoints: Sequence[str], *, tls: Tls | None = None,
                 user: str | None = None, password: str | None = None,
                 timeout: float = 1.0, budget: float = 15.0) -> None:
        if not endpoints:
            raise InvalidInput("etcd: no endpoint given")
        self.endpoints = list(endpoints)
        self.timeout = timeout  # one RPC
        self.budget = budget  # one call, retries included
        self._tls = tls
        self._user, self._password = user, password
        self._lock = threading.Lock()
        self._channels: dict[str, Stubs] = {}
        self._current = secrets.randbelow(len(self.endpoints))  # replicas spread out
        self._failed_at: dict[str, float] = {}  # endpoint -> its last transient failure
        self._token: str | None = None

    # --- channels -----------------------------------------------------------------------

    def _channel(self, endpoint: str) -> Stubs:
        """The endpoint's channel with its stubs, made once (a stub costs as much CPU
        as a call: grpc registers every method with the channel)."""
        with self._lock:
            stubs = self._channels.get(endpoint)
            if stubs is None:
                opts = [("grpc.max_receive_message_length", 64 << 20),
                        ("grpc.keepalive_time_ms", 10_000),
                        ("grpc.keepalive_timeout_ms", 3_000),
                        ("grpc.initial_reconnect_backoff_ms", 100),
                        ("grpc.max_reconnect_backoff_ms", 1_000)]
                if self._tls is not None:
                    creds = grpc.ssl_channel_credentials(self._tls.ca, self._tls.key,
                                                         self._tls.cert)
                    ch = grpc.secure_channel(endpoint, creds, options=opts)
                else:
                    ch = grpc.insecure_channel(endpoint, options=opts)
                stubs = self._channels[endpoint] = Stubs(ch)
            return stubs

    def _endpoint(self) -> str:
        with self._lock:
            return self.endpoints[self._current % len(self.endpoints)]

    def _next_endpoint(self, failed: str) -> None:
        """Leave ``failed`` for the endpoint that failed longest ago (or never): after
        a leader's death the survivors are tried before the dead one again."""
        with self._lock:
            self._failed_at[failed] = time.monotonic()
            if self.endpoints[self._current % len(self.endpoints)] != failed:
                return  # another thread moved on already
            n = len(self.endpoints)
            order = [(self._current + i) % n for i in range(1, n)] or [self._current % n]
            self._current = min(order, key=lambda i: self._failed_at.get(
                self.endpoints[i], float("-inf")))

    def _metadata(self, endpoint: str) -> tuple[tuple[str, str], ...] | None:
        if self._user is None:
            return None
        if self._token is None:
            req = rpc.AuthenticateRequest(name=self._user, password=self._password or "")
            resp = self._channel(endpoint).auth.Authenticate(req, timeout=self.timeout)
            self._token = str(resp.token)
        return (("token", self._token),)

    def close(self) -> None:
        with self._lock:
            for stubs in self._channels.values():
                stubs.channel.close()
            self._channels.clear()

    # --- calls --------------------------------------------------------------------------

    @staticmethod
    def transient(exc: grpc.RpcError) -> bool:
        code = exc.code() if hasattr(exc, "code") else None
        text = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
        return code in TRANSIENT or any(t in text for t in TRANSIENT_TEXT)

    def call(self, what: str, fn: Callable[[Stubs, Any], T], *,
             retry: bool = True) -> T:
        """``fn(stubs, metadata)`` on the current endpoint; on a transient failure the
        next endpoint, with backoff, until the budget is spent. ``retry=False`` (a
        commit): one try, and a transient failure is :class:`Retry` (it may have
        committed; the caller's next try finds out)."""
        deadline = time.monotonic() + self.budget
        delay = 0.05
        tried: set[str] = set()
        while True:
            endpoint = self._endpoint()
            try:
                return fn(self._channel(endpoint), self._metadata(endpoint))
            except grpc.RpcError as exc:
                if self._failed(what, endpoint, exc, retry=retry) and (
                        time.monotonic() < deadline):
                    continue  # a new token: at once
                log.debug("etcd %s on %s failed (%s); trying again", what, endpoint,
                          self._text(exc))
                tried.add(endpoint)
                if len(tried) < len(self.endpoints) and time.monotonic() < deadline:
                    continue  # another member may answer now: no wait before it
                if time.monotonic() + delay > deadline:
                    raise Unavailable(f"etcd unreachable ({', '.join(self.endpoints)}): "
                                      f"{what}: {self._text(exc)}") from None
                time.sleep(delay)  # every member failed once: back off, then a new round
                delay = min(delay * 2, 0.5)
                tried.clear()

    @staticmethod
    def _text(exc: grpc.RpcError) -> str:
        code = exc.code() if hasattr(exc, "code") else None
        text = (exc.details() if hasattr(exc, "details") else "") or ""
        return text or str(code)

    def _failed(self, what: str, endpoint: str, exc: grpc.RpcError, *, retry: bool) -> bool:
        """Raise what a failed call means to the caller, or return when another try may
        succeed (True: at once, with a new token; False: after a backoff, at the next
        endpoint). Without ``retry`` (a commit) a transient failure is :class:`Retry`."""
        code = exc.code() if hasattr(exc, "code") else None
        text = (exc.details() if hasattr(exc, "details") else "") or ""
        if code == grpc.StatusCode.UNAUTHENTICATED or "invalid auth token" in text:
            self._token = None  # expired: authenticate again
            if not retry:
                raise Retry(f"{what}: the auth token expired") from None
            return True
        if "database space exceeded" in text:
            raise Unavailable("etcd is out of space (its quota is reached): compact "
                              "and defragment it (docs/ETCD.md)") from None
        if "too many operations" in text:
            raise Unavailable("etcd refused a transaction with too many operations: "
                              "start etcd with a larger --max-txn-ops "
                              "(docs/ETCD.md)") from None
        if code in (grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED) or any(t in text for t in AUTH_TEXT):
            raise Unavailable(f"etcd refused {what}: {text} (check the URL's user= "
                              "and password_file=, docs/ETCD.md)") from None
        if not self.transient(exc):
            if "compacted" in text or "future revision" in text:
                raise Retry(text) from None  # a pinned revision gone or not there
            raise Unavailable(f"etcd {what} failed: {text or code}") from None
        self._next_endpoint(endpoint)
        if not retry:
            raise Retry(f"{what} on {endpoint}: {text or code}") from None
        return False

    def _raise_once(self, what: str, endpoint: str, exc: grpc.RpcError) -> NoReturn:
        """What a failed call that is not tried again (a commit, a watch) raises:
        :class:`Retry` when another try may succeed, else the error itself."""
        self._failed(what, endpoint, exc, retry=False)
        raise Retry(f"{what} on {endpoint}: {self._text(exc)}") from None  # not reached

    def range(self, key: bytes, end: bytes | None = None, *, revision: int = 0,
              limit: int = 0, descending: bool = False, keys_only: bool = False,
              count_only: bool = False, by_create: bool = False,
              min_create: int = 0) -> RangeResult:
        """Keys in [key, end); at ``revision`` (0: now, linearizable). A read at a given
        revision is served by the member itself (serializable): the revision's state is
        fixed, and the member that named it has applied it."""
        req = rpc.RangeRequest(key=key, range_end=end or b"", revision=revision, limit=limit,
                               keys_only=keys_only, count_only=count_only,
                               min_create_revision=min_create, serializable=revision > 0)
        if descending or by_create:
            req.sort_order = rpc.RangeRequest.DESCEND if descending else rpc.RangeRequest.ASCEND
            req.sort_target = (rpc.RangeRequest.CREATE if by_create
                               else rpc.RangeRequest.KEY)

        def go(stubs: Stubs, md: Any) -> RangeResult:
            resp = stubs.kv.Range(req, timeout=self.timeout, metadata=md)
            return RangeResult([Kv(kv.key, kv.value, kv.mod_revision, kv.create_revision,
                                   kv.lease) for kv in resp.kvs],
                               int(resp.header.revision), bool(resp.more), int(resp.count))

        return self.call("range", go)

    def txn(self, compares: Iterable[Any], success: Iterable[Any],
            failure: Iterable[Any] = ()) -> tuple[bool, int, Any]:
        """One etcd transaction, tried once; (succeeded, revision, responses)."""
        return self.txn_start(compares, success, failure)()

    def txn_start(self, compares: Iterable[Any], success: Iterable[Any],
                  failure: Iterable[Any] = (), *, on_done: Callable[[], None] | None = None
                  ) -> Callable[[], tuple[bool, int, Any]]:
        """Send one etcd transaction; the function returned waits for its answer
        (:meth:`txn`'s), so that the caller prepares the next one meanwhile.
        ``on_done`` is called (on gRPC's thread) once the answer or the failure is in."""
        req = rpc.TxnRequest(compare=list(compares), success=list(success),
                             failure=list(failure))
        # a big transaction (deleting a pool) may take longer than a point read
        deadline = self.timeout + 0.001 * (len(req.compare) + len(req.success))
        endpoint = self._endpoint()
        try:
            future = self._channel(endpoint).kv.Txn.future(
                req, timeout=deadline, metadata=self._metadata(endpoint))
        except grpc.RpcError as exc:
            self._raise_once("transaction", endpoint, exc)
        if on_done is not None:
            future.add_done_callback(lambda _: on_done())

        def answer() -> tuple[bool, int, Any]:
            try:
                resp = future.result()
            except grpc.RpcError as exc:
                self._raise_once("transaction", endpoint, exc)
            return bool(resp.succeeded), int(resp.header.revision), resp.responses

        return answer

    def get_many(self, keys: Sequence[bytes], *, revision: int = 0
                 ) -> tuple[list[Kv | None], int]:
        """Several keys in one round trip (a read-only transaction), at ``revision`` (0:
        now); each key's value or None, and the revision read."""
        req = rpc.TxnRequest(success=[rpc.RequestOp(request_range=rpc.RangeRequest(
            key=k, revision=revision)) for k in keys])

        def go(stubs: Stubs, md: Any) -> tuple[list[Kv | None], int]:
            resp = stubs.kv.Txn(req, timeout=self.timeout + 0.001 * len(keys), metadata=md)
            out: list[Kv | None] = []
            for r in resp.responses:
                kvs = r.response_range.kvs
                out.append(Kv(kvs[0].key, kvs[0].value, kvs[0].mod_revision,
                              kvs[0].create_revision, kvs[0].lease) if kvs else None)
            return out, revision or int(resp.header.revision)

        return self.call("multi-get", go)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        req = rpc.PutRequest(key=key, value=value, lease=lease)
        return self.call("put", lambda stubs, md: int(stubs.kv.Put(
            req, timeout=self.timeout, metadata=md).header.revision))

    def delete_range(self, key: bytes, end: bytes | None = None) -> int:
        req = rpc.DeleteRangeRequest(key=key, range_end=end or b"")
        return self.call("delete", lambda stubs, md: int(stubs.kv.DeleteRange(
            req, timeout=self.timeout, metadata=md).deleted))

    def lease_grant(self, ttl: int) -> int:
        req = rpc.LeaseGrantRequest(TTL=ttl)
        return self.call("lease grant", lambda stubs, md: int(stubs.lease.LeaseGrant(
            req, timeout=self.timeout, metadata=md).ID))

    def status(self, endpoint: str) -> Any:
        """One member's status (db size, leader, raft index): for checks and warnings."""
        return self._channel(endpoint).maintenance.Status(
            rpc.StatusRequest(), timeout=self.timeout, metadata=self._metadata(endpoint))

    def watch(self, key: bytes, end: bytes, start_revision: int) -> Watch:
        """A watch of [key, end) from ``start_revision`` on the current endpoint (no
        deadline: it lasts; :meth:`Watch.cancel` ends it). A failure shows as
        :class:`Retry` while iterating; the next watch goes to the next endpoint."""
        endpoint = self._endpoint()
        create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=key, range_end=end, start_revision=start_revision))
        return Watch(self, endpoint, create)

    def compact(self, revision: int) -> None:
        req = rpc.CompactionRequest(revision=revision, physical=True)
        self.call("compact", lambda stubs, md: stubs.kv.Compact(
            req, timeout=max(self.timeout, 30.0), metadata=md))


class Watch:
    """One open etcd watch: iterate it for etcd's ``WatchResponse`` messages."""

    def __init__(self, client: EtcdClient, endpoint: str, create: Any) -> None:
        self.client, self.endpoint = client, endpoint
        self._ended = threading.Event()

        def requests() -> Iterator[Any]:
            yield create
            self._ended.wait()  # the stream stays open until cancelled

        self._call = client._channel(endpoint).watch.Watch(
            requests(), metadata=client._metadata(endpoint))

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self._call
        except grpc.RpcError as exc:
            if self._ended.is_set():
                return
            self.client._raise_once("watch", self.endpoint, exc)
        finally:
            self._ended.set()

    def cancel(self) -> None:
        self._ended.set()
        self._call.cancel()


# --- transactions ---------------------------------------------------------------------------


def put_op(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def delete_op(key: bytes) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


def mod_equals(key: bytes, mod: int) -> Any:
    return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                       mod_revision=mod)


def nothing_newer(start: bytes, end: bytes, revision: int) -> Any:
    """Every key in [start, end) last changed at or before ``revision`` (none created)."""
    return rpc.Compare(key=start, range_end=end, result=rpc.Compare.LESS,
                       target=rpc.Compare.MOD, mod_revision=revision + 1)


Write = tuple[bytes, int] | None  # (value, lease), or None: a delete


@dataclass
class Stm:
    """One try of an optimistic transaction: reads at one revision, writes buffered."""

    client: EtcdClient
    #: a first try may assume that keys it is about to create are absent, instead of
    #: reading them (:meth:`assume_absent`); the commit's compare catches it when not,
    #: and the next try reads
    optimistic: bool = False
    #: key -> (value, mod_revision) last known, for keys the owner of the cache says
    #: change rarely (an optimistic try uses them unread: the commit compares them)
    cache: dict[bytes, tuple[bytes | None, int]] | None = None
    cacheable: Callable[[bytes], bool] | None = None
    revision: int = 0
    seen: dict[bytes, int] = field(default_factory=dict)
    #: keys taken as absent unread: even a try that writes nothing must verify them
    assumed: set[bytes] = field(default_factory=set)
    ranges: list[tuple[bytes, bytes]] = field(default_factory=list)
    writes: dict[bytes, Write] = field(default_factory=dict)
    #: keys known to be absent on the server at ``revision`` (read so, compared so, or
    #: known by the caller): deleting one that this try put sends nothing
    absent: set[bytes] = field(default_factory=set)
    #: (key, whether it had a write, that write) before every write: a savepoint is a
    #: place in it
    journal: list[tuple[bytes, bool, Write]] = field(default_factory=list)
    # what the server answered at ``revision`` (it cannot change: reads are pinned)
    values: dict[bytes, bytes | None] = field(default_factory=dict)
    answers: dict[tuple[bytes, bytes, bool], tuple[int, RangeResult]] = field(
        default_factory=dict)
    #: a try still committing that this one builds on (:meth:`on_top_of`): its writes are
    #: read as done, and this one commits only after it, compared against its revision
    parent: Stm | None = None
    #: keys this try read from the parent's writes
    from_parent: set[bytes] = field(default_factory=set)

    @classmethod
    def on_top_of(cls, parent: Stm) -> Stm:
        """A try that reads as if ``parent`` had committed (it is on the wire): the
        next group commit is prepared while the one before waits for its answer."""
        # its own revision, not the parent's: the parent may itself be built on one
        # that has committed since, whose writes only the server has
        return cls(parent.client, optimistic=True, cache=parent.cache,
                   cacheable=parent.cacheable, parent=parent)

    def _pin(self, result: RangeResult) -> None:
        if not self.revision:
            self.revision = result.revision

    def get(self, key: bytes) -> bytes | None:
        if key in self.writes:
            w = self.writes[key]
            return None if w is None else w[0]
        parent = self.parent
        if parent is not None and key in parent.writes:  # as the parent leaves it
            w = parent.writes[key]
            self.from_parent.add(key)
            return None if w is None else w[0]
        if key in self.values:
            return self.values[key]
        if parent is not None and key in parent.values and key in parent.seen:
            self.seen.setdefault(key, parent.seen[key])  # as the parent read it
            self.values[key] = parent.values[key]
            return self.values[key]
        if self.optimistic and self.cache is not None and key in self.cache:
            value, mod = self.cache[key]
            self.seen.setdefault(key, mod)
            self.values[key] = value
            return value
        got = self.client.range(key, revision=self.revision)
        self._pin(got)
        kv = got.kvs[0] if got.kvs else None
        self.seen.setdefault(key, kv.mod if kv else 0)
        self.values[key] = kv.value if kv else None
        if kv is None:
            self.absent.add(key)
        self._remember(key, self.values[key], kv.mod if kv else 0)
        return self.values[key]

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """:meth:`get` of each key, those not known here read in one round trip."""
        unknown = [k for k in dict.fromkeys(keys) if k not in self.writes
                   and k not in self.values
                   and (self.parent is None or k not in self.parent.writes)]
        if unknown:
            got, revision = self.client.get_many(unknown, revision=self.revision)
            self.revision = self.revision or revision
            for k, kv in zip(unknown, got, strict=True):
                self.seen.setdefault(k, kv.mod if kv else 0)
                self.values[k] = kv.value if kv else None
                if kv is None:
                    self.absent.add(k)
        return [self.get(k) for k in keys]

    def _remember(self, key: bytes, value: bytes | None, mod: int) -> None:
        if self.cache is not None and self.cacheable is not None and self.cacheable(key):
            self.cache[key] = (value, mod)

    def _server_range(self, start: bytes, end: bytes, limit: int,
                      descending: bool) -> RangeResult:
        """The server's answer at ``revision``, from this try's cache when it covers it."""
        cached = self.answers.get((start, end, descending))
        if cached is not None:
            asked, got = cached
            if asked == 0 or (limit and limit <= asked) or not got.more:
                return got
        got = self.client.range(start, end, revision=self.revision, limit=limit,
                                descending=descending)
        self._pin(got)
        self.answers[(start, end, descending)] = (limit, got)
        theirs = self.parent.writes if self.parent is not None else {}
        for kv in got.kvs:
            if kv.key not in theirs:  # those are read as the parent leaves them
                self.seen.setdefault(kv.key, kv.mod)
                self.values.setdefault(kv.key, kv.value)
        return got

    def range(self, start: bytes, end: bytes, *, limit: int = 0,
              descending: bool = False) -> list[tuple[bytes, bytes]]:
        """Keys in [start, end) in key order (``descending``: reversed), this try's own
        writes included; the part of the range the answer depends on is recorded."""
        mine = {k: w for k, w in self.writes.items() if start <= k < end}
        if self.parent is not None:  # its writes as done, under this try's own
            mine = {**{k: w for k, w in self.parent.writes.items() if start <= k < end},
                    **mine}
        # only deleted keys the server has can push others into the answer
        gone = sum(1 for k, w in mine.items() if w is None and (
            self.seen.get(k) or self.parent is not None))
        ask = limit + gone if limit else 0
        got = self._server_range(start, end, ask, descending)
        if limit and len(got.kvs) > ask:
            got = RangeResult(got.kvs[:ask], got.revision, True, got.count)
        merged = {kv.key: kv.value for kv in got.kvs}
        cover_lo, cover_hi = start, end
        if limit and got.more and got.kvs:  # the answer depends on the range up to here
            if descending:
                cover_lo = got.kvs[-1].key
            else:
                cover_hi = got.kvs[-1].key + b"\0"
        self.ranges.append((cover_lo, cover_hi))
        for k, w in mine.items():
            if cover_lo <= k < cover_hi:
                if w is None:
                    merged.pop(k, None)
                else:
                    merged[k] = w[0]
        keys = sorted(merged, reverse=descending)
        if limit:
            keys = keys[:limit]
        return [(k, merged[k]) for k in keys]

    def _write(self, key: bytes, w: Write, *, drop: bool = False) -> None:
        """Buffer ``w`` (None: a delete) for ``key``; ``drop``: no write at all."""
        self.journal.append((key, key in self.writes, self.writes.get(key)))
        if drop:
            self.writes.pop(key, None)
        else:
            self.writes[key] = w

    def put(self, key: bytes, value: bytes, lease: int = 0, *, absent: bool = False) -> None:
        """Buffer a write; ``absent``: the caller knows the key is not on the server (a
        range's new start inside the old range it replaces), so a later delete of it in
        this try sends nothing."""
        if absent:
            self.absent.add(key)
        self._write(key, (value, lease))

    def expect_absent(self, key: bytes) -> None:
        """Commit only if ``key`` is still absent, without reading it now."""
        if key not in self.writes:
            self.seen.setdefault(key, 0)
            self.assumed.add(key)
            self.absent.add(key)

    def get_or_assume_absent(self, key: bytes) -> bytes | None:
        """:meth:`get`, except on an optimistic try: None, compared at the commit. For
        keys that are almost always absent (a new owner, a new MAC): one read fewer."""
        if (self.optimistic and key not in self.writes and key not in self.values
                and self.seen.get(key, 0) == 0
                and (self.parent is None or key not in self.parent.writes)):
            self.expect_absent(key)
            return None
        return self.get(key)

    def delete(self, key: bytes) -> None:
        self._write(key, None, drop=key in self.absent)

    def savepoint(self) -> int:
        return len(self.journal)

    def rollback_to(self, point: int) -> None:
        """Undo the writes made since :meth:`savepoint` (a batch's failed change alone)."""
        while len(self.journal) > point:
            key, had, before = self.journal.pop()
            if had:
                self.writes[key] = before
            else:
                self.writes.pop(key, None)

    def commit(self) -> int:
        """The one etcd transaction; :class:`Conflict` when something moved, the commit's
        revision otherwise (nothing written: the read revision)."""
        request = self.request()
        if request is None:
            return self.revision  # what it read was read at one revision: nothing to check
        try:
            answer = self.client.txn(*request)
        except Retry:
            self.lost()
            raise
        return self.finish(answer)

    def request(self, parent_revision: int = 0) -> tuple[list[Any], list[Any]] | None:
        """The transaction's compares and operations (None: nothing to commit). On top of
        a parent: once the parent committed at ``parent_revision``, whose writes this try
        read as done; they are compared at that revision, the rest as read."""
        parent = self.parent
        if parent is None and not self.writes and not self.assumed and not (
                self.optimistic and self.cache is not None
                and any(k in self.cache for k in self.seen)):
            return None
        theirs: dict[bytes, Write] = {}
        if parent is not None:
            if not parent_revision:
                raise ValueError("a try on top of a parent commits after it")
            theirs = parent.writes
        # what this try read of the parent's writes: as the parent left it, or gone
        used = set(self.from_parent)
        compares = []
        for k, m in self.seen.items():
            if k in theirs:
                used.add(k)
            else:
                compares.append(mod_equals(k, m))
        spans: dict[tuple[bytes, bytes], None] = {}  # a range read again: compared once
        if self.revision:
            for s, e in dict.fromkeys(self.ranges):
                inside = sorted(k for k in theirs if s <= k < e)
                used.update(inside)
                # and nothing else there changed since this try read it
                for lo, hi in zip([s, *(k + b"\0" for k in inside)], [*inside, e],
                                  strict=True):
                    if lo < hi:
                        spans[(lo, hi)] = None
        compares += [mod_equals(k, 0 if theirs[k] is None else parent_revision)
                     for k in sorted(used)]
        compares += [nothing_newer(lo, hi, self.revision) for lo, hi in spans]
        ops = [delete_op(k) if w is None else put_op(k, w[0], w[1])
               for k, w in self.writes.items()]
        return compares, ops

    def finish(self, answer: tuple[bool, int, Any]) -> int:
        """What the transaction's answer means: its revision, or :class:`Conflict`."""
        ok, revision, _ = answer
        if not ok:
            if self.cache is not None:  # what it assumed may be stale: forget it
                for k in self.seen:
                    self.cache.pop(k, None)
                for k in self.from_parent:
                    self.cache.pop(k, None)
            raise Conflict("changed meanwhile")
        for k, w in self.writes.items():
            self._remember(k, None if w is None else w[0], 0 if w is None else revision)
        return revision

    def lost(self) -> None:
        """The commit's answer did not come (it may have committed): forget what it
        wrote from the cache."""
        if self.cache is not None:
            for k in self.writes:
                self.cache.pop(k, None)


def read_file(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"etcd {what} {path}: {exc.strerror}") from None


__all__ = ["Conflict", "EtcdClient", "Kv", "RangeResult", "Retry", "Stm", "Tls",
           "prefix_end", "read_file"]
