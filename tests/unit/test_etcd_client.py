"""The etcd client's choice of endpoint and its backoff, against scripted failures.

The real failover (a killed leader, a killed follower) is measured against a real
3-member etcd in tests/integration/test_etcd_store.py and tests/bench/etcd_bench.py;
here the order of tries is checked exactly."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from netd.errors import Unavailable
from netd.ipam import etcd_kv
from netd.ipam.etcd_kv import EtcdClient


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


REFUSED = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
DEADLINE = FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
LEADER_CHANGED = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "etcdserver: leader changed")
#: the member's side of the client's deadline, as etcd 3.4 sent it after a leader kill
SERVER_DEADLINE = FakeRpcError(grpc.StatusCode.UNKNOWN, "context deadline exceeded")


class Script:
    """Per endpoint, the failures its next calls raise (then it answers)."""

    def __init__(self, client: EtcdClient, failures: dict[str, list[Exception]],
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.failures = failures
        self.tries: list[str] = []
        self.sleeps: list[float] = []
        self.clock = 0.0
        monkeypatch.setattr(client, "_channel", lambda endpoint: endpoint)
        monkeypatch.setattr(etcd_kv.time, "sleep", self.sleep)
        monkeypatch.setattr(etcd_kv.time, "monotonic", lambda: self.clock)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock += seconds

    def __call__(self, endpoint: Any, _md: Any) -> str:
        self.tries.append(endpoint)
        self.clock += 0.001
        pending = self.failures.get(endpoint, [])
        if pending:
            raise pending.pop(0) if len(pending) > 1 or pending[0] is not REFUSED \
                else pending[0]  # a dead member refuses for good
        return endpoint


def client_at(first: str) -> EtcdClient:
    client = EtcdClient(["a", "b", "c"])
    client._current = client.endpoints.index(first)
    return client


def test_a_dead_member_is_left_for_the_others_without_a_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_at("a")
    script = Script(client, {"a": [REFUSED], "b": [DEADLINE]}, monkeypatch)
    assert client.call("range", script) == "c"
    assert script.tries == ["a", "b", "c"]
    assert script.sleeps == []  # another member may answer now: no backoff before it
    # the next call stays on the member that answered
    assert client.call("range", script) == "c"
    assert script.tries[-1] == "c"


def test_after_a_failure_the_member_that_failed_longest_ago_is_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The leader-kill sequence seen in etcd_bench: the dead member refuses, a follower
    that still believes in the old leader times out, the new leader answers "leader
    changed" once; then the follower (failed later than the dead member, but the dead
    member refuses in a millisecond) answers."""
    client = client_at("a")
    script = Script(client, {"a": [REFUSED], "b": [DEADLINE],
                             "c": [LEADER_CHANGED]}, monkeypatch)
    assert client.call("range", script) == "b"
    # one backoff, only after each member failed once; then a, the oldest failure, and b
    assert script.tries == ["a", "b", "c", "a", "b"]
    assert script.sleeps == [0.05]


def test_the_backoff_grows_per_round_and_the_budget_ends_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_at("b")
    client.budget = 2.0
    script = Script(client, {e: [REFUSED] for e in "abc"}, monkeypatch)
    with pytest.raises(Unavailable, match="etcd unreachable"):
        client.call("range", script)
    assert script.sleeps == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]  # 1.77 s: 0.5 more passes 2 s
    assert len(script.tries) == 3 * (len(script.sleeps) + 1)  # each round tries all three
    assert set(script.tries[:3]) == {"a", "b", "c"}


def test_one_endpoint_backs_off_after_each_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    client = EtcdClient(["only"])
    script = Script(client, {"only": [DEADLINE, DEADLINE]}, monkeypatch)
    assert client.call("range", script) == "only"
    assert script.sleeps == [0.05, 0.1]


def test_the_members_own_deadline_is_tried_again_not_answered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """etcd_bench's failover once answered 503 "etcd range failed: context deadline
    exceeded": the member's side of the deadline, code UNKNOWN, arrived first."""
    client = client_at("a")
    script = Script(client, {"a": [SERVER_DEADLINE]}, monkeypatch)
    assert client.call("range", script) == "b"
    assert script.tries == ["a", "b"]


def test_an_error_that_is_not_transient_is_answered_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_at("a")
    script = Script(client, {"a": [FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT,
                                                "etcdserver: key is not provided")]},
                    monkeypatch)
    with pytest.raises(Unavailable, match="key is not provided"):
        client.call("range", script)
    assert script.tries == ["a"]
