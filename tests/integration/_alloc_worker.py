"""Allocation load worker for the concurrency tests (run as a separate process).

    python _alloc_worker.py URL TOKEN PREFIX COUNT START_AT POOL[,POOL...] [RELEASE_EVERY]

Waits until the wall-clock time START_AT, then allocates COUNT addresses over
one keep-alive httpx connection, cycling through the pools, with container ids
PREFIX-i. With RELEASE_EVERY=k, every k-th allocation is released right away
(by owner). Prints one JSON object: {"held": [...], "released": [...], "errors": [...]}.
"""

from __future__ import annotations

import json
import sys
import time

import httpx


def main() -> None:
    url, token, prefix, count, start_at, pools = sys.argv[1:7]
    release_every = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    pool_list = pools.split(",")
    held: list[dict[str, object]] = []
    released: list[dict[str, object]] = []
    errors: list[str] = []
    with httpx.Client(base_url=url, timeout=60,
                      headers={"Authorization": f"Bearer {token}",
                               "X-Netd-Actor": f"worker:{prefix}"}) as c:
        c.get("/healthz")  # open the connection before the start line
        time.sleep(max(0.0, float(start_at) - time.time()))
        for i in range(int(count)):
            cid = f"{prefix}-{i}"
            r = c.post("/v1/allocate", json={"pool": pool_list[i % len(pool_list)],
                                             "container_id": cid, "host": prefix})
            if r.status_code != 200:
                errors.append(f"allocate {cid}: {r.status_code} {r.text}")
                continue
            a = r.json()
            rec = {"pool": a["pool"], "ip": a["ip"], "mac": a["mac"], "container_id": cid}
            if release_every and i % release_every == 0:
                r = c.post("/v1/release", json={"container_id": cid})
                if r.status_code != 200 or len(r.json()["released"]) != 1:
                    errors.append(f"release {cid}: {r.status_code} {r.text}")
                    held.append(rec)
                else:
                    released.append(rec)
            else:
                held.append(rec)
    json.dump({"held": held, "released": released, "errors": errors}, sys.stdout)


if __name__ == "__main__":
    main()
