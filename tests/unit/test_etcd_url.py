"""etcd store URLs: what is accepted, and clear refusals for what would go wrong later."""

from __future__ import annotations

import pytest

from netd.errors import InvalidInput
from netd.ipam.etcd_store import DEFAULT_PREFIX, parse_etcd_url
from netd.ipam.store import check_store_url


def test_endpoints_prefix_and_options() -> None:
    u = parse_etcd_url("etcd://10.0.0.1:2379,10.0.0.2:2379,etcd-3.dc1:2379/dc1/ipam"
                       "?cacert=/etc/netd/ca.pem&cert=/etc/netd/c.pem&key=/etc/netd/c.key"
                       "&user=netd&password_file=/etc/netd/etcd.pass&timeout=1.5"
                       "&history_days=90&quota_gb=8")
    assert u.endpoints == ("10.0.0.1:2379", "10.0.0.2:2379", "etcd-3.dc1:2379")
    assert u.prefix == "/dc1/ipam/"
    assert (u.cacert, u.cert, u.key) == ("/etc/netd/ca.pem", "/etc/netd/c.pem",
                                         "/etc/netd/c.key")
    assert (u.user, u.password_file, u.timeout, u.history_days, u.quota_gb) == (
        "netd", "/etc/netd/etcd.pass", 1.5, 90, 8.0)
    plain = parse_etcd_url("etcd://127.0.0.1:2379")
    assert plain.prefix == DEFAULT_PREFIX and plain.cacert is None
    assert check_store_url("etcd://127.0.0.1:2379").etcd == plain


@pytest.mark.parametrize(("url", "why"), [
    ("etcd://", "names no endpoint"),
    ("etcd://h1", "is not HOST:PORT"),
    ("etcd://h1:99999", "is not HOST:PORT"),
    ("etcd://root:secret@h1:2379", "user info"),
    ("etcd://h1:2379?password=x", "unknown etcd URL option"),
    ("etcd://h1:2379?user=netd", "needs password_file"),
    ("etcd://h1:2379?cert=/c.pem", "needs both cert= and key="),
    ("etcd://h1:2379?timeout=0", "timeout= must be"),
    ("etcd://h1:2379?history_days=x", "a whole number"),
])
def test_refused(url: str, why: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check_store_url(url)
    assert why in info.value.message
