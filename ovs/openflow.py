"""OpenFlow 1.3 to one bridge, from the agent itself: what ``ovs-ofctl`` does, in process.

ovs-vswitchd listens on ``<rundir>/<bridge>.mgmt`` for local OpenFlow
connections. The agent connects there (no controller: the bridge is
``fail_mode=secure``, so nothing "fails open" when the agent is away; its
flows stay until the agent changes them or ovs-vswitchd restarts, which
:class:`~netd.ovs.driver.VlanDriver` watches for). Messages are built and
parsed by os-ken's OpenFlow library (the maintained ryu fork), without its
eventlet hub or app manager: one blocking socket, one request at a time.

Every batch of flow changes ends with a barrier, so :meth:`apply` returns when
ovs-vswitchd has taken them all, and raises :class:`OpenFlowError` naming the
first change it refused.
"""

from __future__ import annotations

import itertools
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from os_ken.ofproto import ofproto_parser
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from netd.dataplane.errors import DataplaneError

from .flows import Flow

log = logging.getLogger(__name__)

HEADER = struct.Struct("!BBHI")
VERSION = ofp.OFP_VERSION  # 0x04, OpenFlow 1.3
CONNECT_WAIT = 3.0  # seconds a connect waits for the management socket to appear


class OpenFlowError(DataplaneError):
    code = "openflow_error"


class _Datapath:
    """What os-ken's messages need of a datapath to (de)serialize: the protocol modules."""

    ofproto = ofp
    ofproto_parser = parser


def _match(flow: Flow) -> Any:
    return parser.OFPMatch(**dict(flow.match))


def _instructions(flow: Flow) -> list[Any]:
    if flow.normal:
        return [parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS,
                                             [parser.OFPActionOutput(ofp.OFPP_NORMAL)])]
    if flow.goto is not None:
        return [parser.OFPInstructionGotoTable(flow.goto)]
    return []  # no instruction: drop


def _from_stats(stat: Any) -> Flow:
    """A flow as ovs-vswitchd reports it, in :class:`Flow`'s terms."""
    match = tuple((k, v) for k, v in stat.match.items())
    normal, goto = False, None
    for inst in stat.instructions:
        if isinstance(inst, parser.OFPInstructionGotoTable):
            goto = inst.table_id
        elif isinstance(inst, parser.OFPInstructionActions):
            normal = any(isinstance(a, parser.OFPActionOutput) and a.port == ofp.OFPP_NORMAL
                         for a in inst.actions)
    return Flow(stat.table_id, stat.priority, match, stat.cookie, normal, goto)


class OpenFlow:
    """One OpenFlow 1.3 connection to a bridge's management socket."""

    def __init__(self, mgmt: str, timeout: float = 10.0) -> None:
        self.mgmt = mgmt
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._xids = itertools.count(1)
        self._dp = _Datapath()
        self.connected_at = 0.0

    # --- the connection ----------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            deadline = time.monotonic() + CONNECT_WAIT
            while True:  # a bridge just made gets its socket a moment after OVSDB says so
                try:
                    sock.connect(self.mgmt)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            self._sock = sock
            self._send(parser.OFPHello(self._dp))
            hello = self._recv()
        except (OSError, OpenFlowError) as exc:
            sock.close()
            self._sock = None
            raise OpenFlowError(f"cannot speak OpenFlow on {self.mgmt}: {exc}") from None
        if hello.version != VERSION:
            self._drop()
            raise OpenFlowError(f"{self.mgmt} does not speak OpenFlow 1.3 (set the bridge's "
                                "protocols to include OpenFlow13)")
        self.connected_at = time.monotonic()
        return sock

    def _send(self, msg: Any) -> int:
        assert self._sock is not None
        xid = next(self._xids) & 0xFFFFFFFF
        msg.xid = None  # a message sent again after a reconnect gets a new xid
        msg.set_xid(xid)
        msg.serialize()
        self._sock.sendall(bytes(msg.buf))
        return xid

    def _recv(self) -> Any:
        assert self._sock is not None
        head = self._read(HEADER.size)
        version, kind, length, xid = HEADER.unpack(head)
        body = self._read(length - HEADER.size) if length > HEADER.size else b""
        return ofproto_parser.msg(self._dp, version, kind, length, xid, head + body)

    def _read(self, n: int) -> bytes:
        assert self._sock is not None
        chunks, left = [], n
        while left:
            chunk = self._sock.recv(left)
            if not chunk:
                raise OpenFlowError(f"{self.mgmt} closed the connection")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _exchange(self, msgs: Sequence[Any], until: Any, xid_of_last: bool = True
                  ) -> tuple[list[Any], dict[int, Any]]:
        """Send ``msgs``; read until a reply of type ``until`` to the last one. Returns the
        replies of that type and the error messages by the xid they answer."""
        for attempt in (1, 2):  # a connection ovs-vswitchd dropped (restart): once more
            with self._lock:
                try:
                    self._connect()
                    xids = [self._send(m) for m in msgs]
                    replies: list[Any] = []
                    errors: dict[int, Any] = {}
                    while True:
                        got: Any = self._recv()
                        if isinstance(got, parser.OFPErrorMsg):
                            if got.xid not in xids:  # of a request sent without a barrier
                                log.warning("openflow: %s refused request %d (type %d, "
                                            "code %d)", self.mgmt, got.xid, got.type,
                                            got.code)
                                continue
                            errors[got.xid] = got
                            if got.xid == xids[-1]:
                                return replies, errors
                        elif isinstance(got, parser.OFPEchoRequest):
                            self._send(parser.OFPEchoReply(self._dp, data=got.data))
                        elif isinstance(got, until) and (not xid_of_last or got.xid == xids[-1]):
                            replies.append(got)
                            more = getattr(got, "flags", 0) & ofp.OFPMPF_REPLY_MORE
                            if not more:
                                return replies, errors
                except (OSError, OpenFlowError) as exc:
                    self._drop()
                    if attempt == 2:
                        raise OpenFlowError(f"OpenFlow on {self.mgmt}: {exc}") from None
                    log.info("openflow: %s: %s; connecting again", self.mgmt, exc)
        raise AssertionError("unreachable")

    # --- what the driver asks ---------------------------------------------------------------

    def alive(self) -> bool:
        """Whether ovs-vswitchd answers an echo (connects when needed)."""
        try:
            self._exchange([parser.OFPEchoRequest(self._dp, data=b"netd")], parser.OFPEchoReply)
        except OpenFlowError:
            return False
        return True

    def apply(self, add: Iterable[Flow] = (), remove: Iterable[Flow] = ()) -> None:
        """Add (or replace) and remove flows, then a barrier: all taken, or an error."""
        msgs: list[Any] = []
        for f in remove:
            msgs.append(parser.OFPFlowMod(
                self._dp, cookie=f.cookie, cookie_mask=0xFFFFFFFFFFFFFFFF, table_id=f.table,
                command=ofp.OFPFC_DELETE_STRICT, priority=f.priority, match=_match(f),
                out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY))
        for f in add:
            msgs.append(parser.OFPFlowMod(
                self._dp, cookie=f.cookie, table_id=f.table, command=ofp.OFPFC_ADD,
                priority=f.priority, match=_match(f), instructions=_instructions(f)))
        if not msgs:
            return
        self._barrier(msgs)

    def delete(self, cookie: int, mask: int = 0xFFFFFFFFFFFFFFFF, *, wait: bool = True) -> None:
        """Remove every flow whose cookie matches (in every table). ``wait=False`` sends
        the request without a barrier (a DEL: the flows of a port that is gone match
        nothing; a later request on this connection is handled after it)."""
        mod = parser.OFPFlowMod(self._dp, cookie=cookie, cookie_mask=mask,
                                table_id=ofp.OFPTT_ALL, command=ofp.OFPFC_DELETE,
                                out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY)
        if wait:
            self._barrier([mod])
            return
        with self._lock:
            try:
                self._connect()
                self._send(mod)
            except OSError as exc:
                self._drop()
                raise OpenFlowError(f"OpenFlow on {self.mgmt}: {exc}") from None

    def _barrier(self, msgs: list[Any]) -> None:
        msgs = [*msgs, parser.OFPBarrierRequest(self._dp)]
        _, errors = self._exchange(msgs, parser.OFPBarrierReply)
        if errors:
            first = min(errors)
            err = errors[first]
            raise OpenFlowError(f"ovs-vswitchd refused a flow change (type {err.type}, code "
                                f"{err.code}); {len(errors)} of {len(msgs) - 1} refused")

    def dump(self, cookie: int = 0, mask: int = 0) -> list[Flow]:
        """The flows whose cookie matches ``cookie`` under ``mask`` (all with mask 0)."""
        req = parser.OFPFlowStatsRequest(self._dp, table_id=ofp.OFPTT_ALL, cookie=cookie,
                                         cookie_mask=mask, out_port=ofp.OFPP_ANY,
                                         out_group=ofp.OFPG_ANY, match=parser.OFPMatch())
        replies, errors = self._exchange([req], parser.OFPFlowStatsReply)
        if errors:
            raise OpenFlowError(f"ovs-vswitchd refused to list flows on {self.mgmt}")
        return [_from_stats(s) for r in replies for s in r.body]


__all__ = ["OpenFlow", "OpenFlowError"]
