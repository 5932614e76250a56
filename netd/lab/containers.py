"""The lab's podman containers: which run on its networks, and who reaches whom.

``netd lab status`` lists them with their addresses and pings every running
container and the gateway from every running container (one ``podman exec``
per source); ``netd lab down`` removes them first, while the agents can
still unplug them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from netd.lab.procs import run


def podman_available() -> bool:
    return shutil.which("podman") is not None


def lab_containers(networks: Sequence[str]) -> list[dict[str, Any]]:
    """Containers (any state) on the lab's networks: name, id, network, ip, mac, state."""
    if not networks or not podman_available():
        return []
    seen: dict[str, dict[str, Any]] = {}
    for network in networks:
        proc = run(["podman", "ps", "--all", "--format", "json", "--filter",
                     f"network={network}"])
        if proc.returncode != 0 or not proc.stdout.strip():
            continue
        for c in json.loads(proc.stdout):
            names = c.get("Names") or [c.get("Id", "?")[:12]]
            seen.setdefault(c["Id"], {"name": names[0], "id": c["Id"][:12],
                                      "state": c.get("State", "?"), "network": network})
    if not seen:
        return []
    proc = run(["podman", "inspect", "--type", "container", *seen])
    details = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else []
    for d in details:
        entry = seen.get(d.get("Id", ""))
        if entry is None:
            continue
        net = (d.get("NetworkSettings", {}).get("Networks") or {}).get(entry["network"]) or {}
        entry["ip"] = net.get("IPAddress") or ""
        entry["mac"] = net.get("MacAddress") or ""
    return sorted(seen.values(), key=lambda c: (c["network"], c["name"]))


# One exec per source container: ping every target at once, in the background.
# The script is constant; the addresses are its positional arguments.
PING_SCRIPT = (
    'for a in "$@"; do ('
    'o=$(ping -c 1 -W 1 "$a" 2>&1); r=$?; '
    'case "$o" in *"ermission denied"*) echo "noraw $a";; '
    '*) if [ $r -eq 0 ]; then echo "ok $a"; else echo "FAIL $a"; fi;; esac'
    ') & done; wait'
)


def ping_all_from(container: str, addresses: Sequence[str]) -> dict[str, str]:
    """{address: ok | FAIL | noraw | noexec} as seen from inside ``container``.

    ``noraw``: the container lacks NET_RAW, which busybox ping needs;
    ``noexec``: ``podman exec`` itself failed (no ``sh`` or ``ping`` in the image?).
    """
    try:
        proc = run(["podman", "exec", container, "sh", "-c", PING_SCRIPT, "ping-all",
                     *addresses], timeout=30)
    except subprocess.TimeoutExpired:
        return dict.fromkeys(addresses, "FAIL")
    seen: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        verdict, _, address = line.partition(" ")
        if address in addresses and verdict in ("ok", "FAIL", "noraw"):
            seen[address] = verdict
    missing = "noexec" if proc.returncode not in (0, 1) and not seen else "FAIL"
    return {a: seen.get(a, missing) for a in addresses}


def reachability(containers: Sequence[dict[str, Any]], gateway: str
                 ) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    """Ping every running container's IP and the gateway from every running container."""
    running = [c for c in containers if c.get("state") == "running" and c.get("ip")]
    sources = [c["name"] for c in running]
    targets = ["gw", *sources]
    address = {"gw": gateway, **{c["name"]: c["ip"] for c in running}}

    def probe(src: str) -> dict[tuple[str, str], str]:
        others = [t for t in targets if t != src]
        seen = ping_all_from(src, [address[t] for t in others])
        return {(src, t): seen[address[t]] for t in others}

    results: dict[tuple[str, str], str] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for part in pool.map(probe, sources):
            results.update(part)
    return sources, targets, results


__all__ = ["lab_containers", "ping_all_from", "podman_available", "reachability"]
