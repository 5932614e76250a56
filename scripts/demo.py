"""`make demo`: a two-host L2 lab in network namespaces with four podman containers.

Brings up `netd lab` (switch, gateway + IPAM server, two hosts whose bond0 is
taken over by br0, one agent each), starts two busybox containers per host on
the hosts' netd networks, then prints the reachability matrix and the IPAM's
table of who holds which address and MAC. Safe to run twice: the previous
demo lab and its containers are removed first. `make demo-down` removes it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import podman  # noqa: E402

BIN = REPO / ".venv" / "bin"
PREFIX = "ndemo"
LAB_DIR = Path("/run/netd-demo")
ROOTFS = REPO / ".demo" / "rootfs"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print("+ " + " ".join(args), flush=True)
    proc = subprocess.run(args, text=True, check=False)
    if check and proc.returncode != 0:
        sys.exit(f"demo: {args[0]} failed with exit code {proc.returncode}")
    return proc


def down() -> None:
    subprocess.run([str(BIN / "netd"), "lab", "down", "--prefix", PREFIX, "--dir", str(LAB_DIR)],
                   check=False, capture_output=True)


def main(argv: list[str]) -> int:
    down()
    if argv[:1] == ["down"]:
        print("demo lab removed")
        return 0
    podman.ensure_podman()
    podman.busybox_rootfs(ROOTFS)
    sh(str(BIN / "netd"), "lab", "up", "--hosts", "2", "--prefix", PREFIX, "--dir", str(LAB_DIR))
    names = []
    for host in ("h1", "h2"):
        for n in (1, 2):
            name = f"{PREFIX}-{host}-c{n}"
            podman.run_container(name, ROOTFS, ["sleep", "86400"], network=f"{PREFIX}-{host}")
            print(f"started {name} on {host}")
            names.append(name)
    print()
    sh(str(BIN / "netd"), "lab", "status", "--dir", str(LAB_DIR))
    print()
    sh("ip", "netns", "exec", f"{PREFIX}-gw", str(BIN / "netctl"), "--server",
       "http://198.18.0.2:9650", "--token-file", str(LAB_DIR / "token"), "ip", "list")
    print()
    print(f"containers: {', '.join(names)} (podman exec -it NAME sh)")
    print(f"IPAM: ip netns exec {PREFIX}-gw {BIN}/netctl --server http://198.18.0.2:9650 "
          f"--token-file {LAB_DIR}/token pool list")
    print("remove everything: make demo-down")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
