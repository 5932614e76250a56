"""`make demo [MODE=l2|vlan|bgp]`: a lab in network namespaces, four podman containers.

Brings up `netd lab` (switch, gateway + IPAM server, two hosts, one agent each;
l2: bond0 taken over by br0; vlan: bond0 a trunk of ovs0, a router between
VLAN 100 and 200; bgp: two racks of two hosts under FRR ToRs and a core, containers
on h1 and h3), starts two busybox containers per host on the hosts' netd
networks (vlan: one on each VLAN), then prints the reachability matrix and the
IPAM's table of who holds which address and MAC. Safe to run twice: the
previous demo lab and its containers are removed first. `make demo-down`
removes it.
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


UI_PORT = 9650
UI_PID = REPO / ".demo" / "ui-forward.pid"


def stop_forward() -> None:
    """The web view's loopback forward of an earlier demo, if it still runs."""
    import contextlib
    import os
    import signal

    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(UI_PID.read_text()), signal.SIGTERM)
    UI_PID.unlink(missing_ok=True)


def start_forward() -> str:
    """``netd lab forward``: the lab's IPAM (and web view) on 127.0.0.1:UI_PORT."""
    import socket
    import time

    UI_PID.parent.mkdir(parents=True, exist_ok=True)
    log = (REPO / ".demo" / "ui-forward.log").open("ab")
    proc = subprocess.Popen([str(BIN / "netd"), "lab", "forward", "--dir", str(LAB_DIR),
                             "--port", str(UI_PORT)], stdout=log, stderr=log,
                            start_new_session=True)
    UI_PID.write_text(str(proc.pid))
    url = f"http://127.0.0.1:{UI_PORT}"
    for _ in range(50):
        try:
            socket.create_connection(("127.0.0.1", UI_PORT), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return url + "/ui/"


def down() -> None:
    stop_forward()
    subprocess.run([str(BIN / "netd"), "lab", "down", "--prefix", PREFIX, "--dir", str(LAB_DIR)],
                   check=False, capture_output=True)


#: each host's two containers: the podman network suffix of each (lab modules name them)
NETWORKS = {"l2": ("", ""), "vlan": ("-v100", "-v200"), "bgp": ("", "")}
#: the two hosts the demo uses: in bgp mode one in each rack
HOSTS = {"l2": ("h1", "h2"), "vlan": ("h1", "h2"), "bgp": ("h1", "h3")}


def main(argv: list[str]) -> int:
    down()
    if argv[:1] == ["down"]:
        print("demo lab removed")
        return 0
    mode = argv[1] if argv[:1] == ["--mode"] and len(argv) > 1 else "l2"
    if mode not in NETWORKS:
        sys.exit(f"demo: mode {mode!r}: one of {', '.join(NETWORKS)}")
    podman.ensure_podman()
    podman.busybox_rootfs(ROOTFS)
    sh(str(BIN / "netd"), "lab", "up", "--mode", mode, "--hosts", "2", "--prefix", PREFIX,
       "--dir", str(LAB_DIR))
    names = []
    for host in HOSTS[mode]:
        for n, suffix in enumerate(NETWORKS[mode], 1):
            name = f"{PREFIX}-{host}-c{n}"
            network = f"{PREFIX}-{host}{suffix}"
            podman.run_container(name, ROOTFS, ["sleep", "86400"], network=network)
            print(f"started {name} on {host} (network {network})")
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
    ui = start_forward()
    print("remove everything: make demo-down")
    print()
    print(f"web view: {ui}  (log in with the token: {(LAB_DIR / 'token').read_text().strip()})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
