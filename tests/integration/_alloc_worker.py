"""Allocation load worker for the concurrency tests (run as a separate process).

    python _alloc_worker.py URL[,URL...] TOKEN PREFIX COUNT START_AT POOL[,POOL...]
        [RELEASE_EVERY] [HOST]

Waits until the wall-clock time START_AT, then allocates COUNT addresses over
one keep-alive httpx connection, cycling through the pools, with container ids
PREFIX-i. With RELEASE_EVERY=k, every k-th allocation is released right away
(by owner). HOST (default PREFIX) is the host the allocations are for. With
several URLs (API replicas), a request that cannot reach one (connection
refused, a 5xx) is sent again, the same request, to the next: an allocation
by owner is idempotent, so a retry returns what a lost answer held. Prints one
JSON object: {"held": [...], "released": [...], "errors": [...], "retries": N,
"max_latency_s": S}.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import httpx


def main() -> None:
    urls, token, prefix, count, start_at, pools = sys.argv[1:7]
    release_every = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    host = sys.argv[8] if len(sys.argv) > 8 else prefix
    pool_list = pools.split(",")
    held: list[dict[str, object]] = []
    released: list[dict[str, object]] = []
    errors: list[str] = []
    headers = {"Authorization": f"Bearer {token}", "X-Netd-Actor": f"worker:{prefix}"}
    clients = [httpx.Client(base_url=u, timeout=60, headers=headers) for u in urls.split(",")]
    state = {"at": 0, "retries": 0, "max_latency": 0.0}

    def post(path: str, body: dict[str, object]) -> httpx.Response:
        """POST to the current replica; on a failure the next one, for up to 60 s."""
        t0 = time.monotonic()
        while True:
            c = clients[state["at"] % len(clients)]
            try:
                r = c.post(path, json=body)
                if r.status_code < 500:
                    state["max_latency"] = max(state["max_latency"], time.monotonic() - t0)
                    return r
            except httpx.TransportError:
                r = None
            if time.monotonic() - t0 > 60:
                if r is None:
                    raise RuntimeError(f"{path}: no replica answered for 60 s")
                return r
            state["retries"] += 1
            if len(clients) > 1:
                state["at"] += 1
            time.sleep(0.05)

    try:
        for c in clients:
            with contextlib.suppress(httpx.TransportError):
                c.get("/healthz")  # open the connections before the start line
        time.sleep(max(0.0, float(start_at) - time.time()))
        for i in range(int(count)):
            cid = f"{prefix}-{i}"
            r = post("/v1/allocate", {"pool": pool_list[i % len(pool_list)],
                                      "container_id": cid, "host": host})
            if r.status_code != 200:
                errors.append(f"allocate {cid}: {r.status_code} {r.text}")
                continue
            a = r.json()
            rec = {"pool": a["pool"], "ip": a["ip"], "mac": a["mac"], "container_id": cid}
            if release_every and i % release_every == 0:
                r = post("/v1/release", {"container_id": cid})
                if r.status_code != 200 or len(r.json()["released"]) > 1:
                    errors.append(f"release {cid}: {r.status_code} {r.text}")
                    held.append(rec)
                else:
                    released.append(rec)
            else:
                held.append(rec)
    finally:
        for c in clients:
            c.close()
    json.dump({"held": held, "released": released, "errors": errors,
               "retries": state["retries"], "max_latency_s": state["max_latency"]},
              sys.stdout)


if __name__ == "__main__":
    main()
