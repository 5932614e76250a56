"""netctl's pure parts: the table formatter, exit codes, option parsing."""

from __future__ import annotations

import pytest

from netd import errors
from netd.cli import netctl


def test_table_aligns_columns_and_right_aligns_numbers() -> None:
    out = netctl.table(["NAME", "FREE", "LABELS"],
                       [["web", 245, {"a": "b"}], ["database", 3, None], ["x", None, ""]])
    assert out.splitlines() == [
        "NAME      FREE  LABELS",
        "web        245  {'a': 'b'}",
        "database     3  -",
        "x            -  -",
    ]


def test_table_without_rows_is_the_header() -> None:
    assert netctl.table(["HOST", "ALLOCATIONS"], []) == "HOST  ALLOCATIONS"


def test_table_cells_stay_on_one_line() -> None:
    assert netctl.table(["NOTE"], [["two\nlines"]]).splitlines() == ["NOTE", "two lines"]


@pytest.mark.parametrize(("err", "code"), [
    (errors.PoolNotFound("x"), 3), (errors.NotFound("x"), 3),
    (errors.PoolExists("x"), 4), (errors.AddressInUse("x"), 4), (errors.PoolInUse("x"), 4),
    (errors.InvalidInput("x"), 5), (errors.Unauthorized("x"), 6), (errors.Unavailable("x"), 7),
    (errors.NetdError("x"), 1),
])
def test_exit_codes(err: errors.NetdError, code: int) -> None:
    assert netctl.exit_code_for(err) == code


def test_iso_time() -> None:
    assert netctl.iso(0) == "-"
    assert netctl.iso(1_700_000_000.5) == "2023-11-14T22:13:20Z"


def test_workload_label_summary() -> None:
    assert netctl.workload({"K8S_POD_NAMESPACE": "ns", "K8S_POD_NAME": "p"}) == "ns/p"
    assert netctl.workload({"container_name": "web-1", "x": "y"}) == "web-1"
    assert netctl.workload({"b": "2", "a": "1"}) == "a=1,b=2"
    assert netctl.workload(None) == ""


def test_usage_errors_need_no_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert netctl.run(["--server", "http://127.0.0.1:1", "pool", "create", "x",
                       "--cidr", "10.0.0.0/24", "--route", "10.1.0.0/16,via"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("netctl: error: Invalid value for '--route'")
    assert err.count("\n") == 1


def test_what_netctl_prints_never_steers_the_terminal() -> None:
    """Data the IPAM holds from before its checks (or from another writer) is shown with
    escapes, never as escape sequences, bidi overrides or hidden characters."""
    out = netctl.table(["ID", "NOTE"], [["c\u202egpj.exe", "\x1b]0;pwned\x07"],
                                        ["ok\u200b", "fine"]])
    assert "\x1b" not in out and "\u202e" not in out and "\u200b" not in out
    assert "c\\u202egpj.exe" in out and "\\x1b]0;pwned\\x07" in out and "ok\\u200b" in out
    assert netctl.details([("owner", "a\u2066b")]) == "owner:  a\\u2066b"


def test_netctl_error_messages_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    netctl._fail("pool 'x\x1b[2J' not found", 3)
    assert capsys.readouterr().err == "netctl: error: pool 'x\\x1b[2J' not found\n"
