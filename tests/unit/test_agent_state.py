"""The agent's state database: what it records, its schema version, and the migration of
what the first release (0.1.0) wrote."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from netd.agent.state import SCHEMA_VERSION, Attachment, StateStore

V1_DUMP = Path(__file__).parent / "data" / "agent_db_v1.sql"
C1 = "c1" * 32


def v1_database(state_dir: Path) -> Path:
    """state_dir/agent.db as release 0.1.0 left it (tests/unit/data/agent_db_v1.sql)."""
    state_dir.mkdir(parents=True)
    db = sqlite3.connect(state_dir / "agent.db")
    db.executescript(V1_DUMP.read_text())
    db.close()
    return state_dir / "agent.db"


def test_a_new_database_has_the_current_schema(tmp_path: Path) -> None:
    st = StateStore(str(tmp_path))
    assert st.migrated_from == SCHEMA_VERSION
    st.put(Attachment("n", "c", "eth0", "netd-cni", "ready", "/x", "lab", host_ifname="ndv1",
                      ip="198.18.0.50", mac="0a:58:c6:12:00:32", address="198.18.0.50/24",
                      gateway="198.18.0.1", routes=[("0.0.0.0/0", "198.18.0.1")], mode="l2",
                      mtu=9000, vlan=7, data={"bridge": "br0"}, extra={"k": 1}))
    st.close()
    again = StateStore(str(tmp_path))
    got = again.get("n", "c", "eth0")
    assert got is not None and (got.mtu, got.vlan, got.mode, got.data) == (9000, 7, "l2",
                                                                         {"bridge": "br0"})
    assert got.routes == [("0.0.0.0/0", "198.18.0.1")] and got.extra == {"k": 1}
    attached = got.attached()
    assert attached is not None and attached.mtu == 9000 and attached.vlan == 7
    assert oct((tmp_path / "agent.db").stat().st_mode & 0o777) == "0o600"
    version = sqlite3.connect(tmp_path / "agent.db").execute("PRAGMA user_version").fetchone()
    assert version[0] == SCHEMA_VERSION
    again.close()


def test_the_first_releases_database_is_migrated(tmp_path: Path) -> None:
    v1_database(tmp_path / "state")
    st = StateStore(str(tmp_path / "state"))
    assert st.migrated_from == 1
    ready = st.get("rack1", C1, "eth0")
    assert ready is not None and ready.state == "ready" and ready.mode == "l2"
    assert (ready.address, ready.gateway) == ("198.18.0.50/24", "198.18.0.1")
    assert ready.routes == [("0.0.0.0/0", "198.18.0.1"), ("198.19.0.0/16", "198.18.0.1")]
    assert ready.host_ifname == "ndv5d0e3f0c1a2b" and ready.netns == "/run/netns/c1"
    assert ready.attached() is not None
    adding = st.get("rack1", "c2" * 32, "eth0")
    assert adding is not None and adding.state == "adding"  # reconcile undoes it
    ipam_only = st.get("bridged", "c3" * 32, "eth1")
    assert ipam_only is not None and ipam_only.host_ifname is None
    assert ipam_only.address == "198.18.0.51/24" and ipam_only.endpoint() is None
    # Docker endpoints became attachments, handed over, with their first-release names
    docker = {a.container_id: a for a in st.all(plugin="docker")}
    joined = docker["e1" * 32]
    assert (joined.state, joined.netns, joined.network) == ("ready", None, "d" * 64)
    assert (joined.host_ifname, joined.peer_ifname) == ("ndd1a2b3c4d5e6f", "ndp1a2b3c4d5e6f")
    assert joined.extra["container_name"] == "web" and joined.extra["docker_pid"] == 4242
    assert joined.address == "198.18.0.60/24" and joined.extra["joined"] is True
    assert docker["e2" * 32].state == "adding"
    # the rest is as it was
    assert [(p.container_id, p.ip) for p in st.pending()] == [("c4" * 32, "198.18.0.52")]
    assert [n.pool for n in st.docker_networks()] == ["lab"]
    assert {a.owner for a in st.docker_addresses()} == {"e1" * 32,
                                                        "docker-pending-0242c612003d"}
    tables = {r[0] for r in st._rows("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "docker_endpoints" not in tables and "attachments_v1" not in tables
    st.close()
    # opening it again migrates nothing
    st = StateStore(str(tmp_path / "state"))
    assert st.migrated_from == SCHEMA_VERSION and len(st.all()) == 5
    st.close()


def test_a_failed_migration_changes_nothing(tmp_path: Path, monkeypatch:
                                            pytest.MonkeyPatch) -> None:
    path = v1_database(tmp_path / "state")
    before = list(sqlite3.connect(path).iterdump())
    from netd.agent import state as state_mod

    def broken(db: sqlite3.Connection) -> None:
        db.execute("ALTER TABLE attachments RENAME TO attachments_v1")
        raise RuntimeError("power cut")

    monkeypatch.setitem(state_mod.MIGRATIONS, 1, broken)
    with pytest.raises(RuntimeError, match="power cut"):
        StateStore(str(tmp_path / "state"))
    assert list(sqlite3.connect(path).iterdump()) == before


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    db = sqlite3.connect(tmp_path / "state" / "agent.db")
    db.execute("CREATE TABLE attachments (x)")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="newer netd"):
        StateStore(str(tmp_path / "state"))
