"""``netd fabric config`` as operators run it, with real FRR 8.4 parsing what it writes.

``vtysh -C`` reads each file with the command tree of the daemons (no daemon
needs to run): a line FRR does not know fails it. The lab's ToRs and core run
these same files (the BGP lab).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, bin_path, require

pytestmark = [pytest.mark.real]

EXAMPLE = REPO / "docs" / "examples" / "fabric.toml"


def test_the_generated_files_are_accepted_by_frr(tmp_path: Path) -> None:
    require(shutil.which("vtysh") is not None, "FRR is missing (apt-get install frr)")
    out = tmp_path / "frr"
    proc = subprocess.run([bin_path("netd"), "fabric", "config", str(EXAMPLE), "--out",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "4 file(s) accepted" in proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["core.conf", "tor-r1.conf", "tor-r2a.conf", "tor-r2b.conf"]
    for name in files:  # once more by hand: the check is FRR's, not ours
        check = subprocess.run(["vtysh", "-C", "-f", str(out / name)], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, (name, check.stdout, check.stderr)
    # and FRR does refuse what it does not know (the check is not a no-op)
    bad = tmp_path / "bad.conf"
    bad.write_text((out / "core.conf").read_text().replace(
        " bgp router-id", " bgp router-identity"))
    assert subprocess.run(["vtysh", "-C", "-f", str(bad)], capture_output=True,
                          timeout=60).returncode != 0


def test_a_bad_description_is_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    desc = tmp_path / "fabric.toml"
    desc.write_text(EXAMPLE.read_text().replace("tor_asn = 65001", "tor_asn = 64512"))
    out = tmp_path / "out"
    proc = subprocess.run([bin_path("netd"), "fabric", "config", str(desc), "--out",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "must differ" in proc.stderr
    assert not out.exists()
