"""Web view benchmark: every /ui/ page on a pool of 100,000 allocations (SQLite).

    .venv/bin/python -m tests.bench.ui_bench [--out .bench/ui.json] [--n 100000]

A benchmark, not a test: the IPAM app in-process (Starlette's test client, no
network), the pool filled through the IPAM rules, then each page asked for
five times after one warm-up; ms per page. No target in issue 13 beyond "fast
on a pool of 100,000 allocations": the figure to watch is that a page deep in
the pool, by host or a search costs about what the first page costs (paged
queries and indexes, never a whole table). Exit 1 when a page does not answer
200 or a search does not find what it must.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.ui_bench")
    ap.add_argument("--out", default=".bench/ui.json")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="500 allocations (the test suite)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.repeat = 500, 1
    from fastapi.testclient import TestClient

    from netd.ipam.api import create_app
    from netd.ipam.metrics import Metrics
    from netd.ipam.service import IPAM, AllocRequest, PoolSpec
    from netd.ipam.store import SqliteStore

    with tempfile.TemporaryDirectory(prefix="netd-ui-bench-") as tmp:
        store = SqliteStore(os.path.join(tmp, "ipam.db"))
        ipam = IPAM(store)
        ipam.create_pool(PoolSpec(name="big", cidr="10.128.0.0/15"))
        t0 = time.monotonic()
        for i in range(args.n):
            ipam.allocate(AllocRequest(pool="big", container_id=f"c{i:06d}",
                                       host=f"node-{i % 200}", labels={"k8s.pod": f"ns/p{i}"},
                                       handle=f"ns/p{i}"))
        filled = time.monotonic() - t0
        mid = args.n // 2
        a = ipam.search(f"c{mid:06d}")["allocations"][0][0]
        deep = f"big/10.128.{(mid >> 8) & 255}.{mid & 255}"
        pages = {"pools": "/ui/", "pool, first page": "/ui/pools/big",
                 "pool, a page deep in": f"/ui/pools/big?after={deep}",
                 "pool, by host": "/ui/pools/big?host=node-77",
                 "search by MAC": f"/ui/search?q={a.mac}",
                 "search by container id": f"/ui/search?q=c{mid:06d}",
                 "search by handle": f"/ui/search?q=ns/p{mid}",
                 "address history": f"/ui/addresses/{a.ip >> 24}.{(a.ip >> 16) & 255}."
                                    f"{(a.ip >> 8) & 255}.{a.ip & 255}",
                 "hosts": "/ui/hosts"}
        results: dict[str, Any] = {}
        code = 0
        app = create_app(ipam, "bench-token", Metrics())
        with TestClient(app) as c:
            h = {"Authorization": "Bearer bench-token"}
            for name, path in pages.items():
                r = c.get(path, headers=h)
                t0 = time.monotonic()
                for _ in range(args.repeat):
                    r = c.get(path, headers=h)
                ms = 1000 * (time.monotonic() - t0) / args.repeat
                ok = r.status_code == 200 and (not name.startswith("search")
                                               or f"c{mid:06d}/eth0" in r.text)
                code |= 0 if ok else 1
                results[name] = {"ms": round(ms, 1), "ok": ok}
        store.close()
    doc = {"env": {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpus": os.cpu_count(),
                   "python": platform.python_version()},
           "params": {"n": args.n, "repeat": args.repeat, "smoke": args.smoke},
           "fill_s": round(filled, 1), "pages": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"web view on {args.n:,} allocations (SQLite, in-process), ms per page:")
    for name, r in results.items():
        print(f"  {name:24s} {r['ms']:7.1f}  {'ok' if r['ok'] else 'WRONG ANSWER'}")
    print(f"(JSON: {out})")
    return code


if __name__ == "__main__":
    sys.exit(main())
