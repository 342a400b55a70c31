"""A hostile request next to a normal one: how long `imgsearch serve` takes to answer each.

    python bench/server_limits.py [--runs 5]

Builds the tiny shapes model and library in a temporary folder (seconds), starts the server in this process,
then times: a normal text query alone; a 1.5 MB POST of 150,000 texts (refused by the request's term cap
before any encoding); the normal query sent while that request is in flight; 100,000-deep nested JSON.
Prints medians in milliseconds and the ratio of the normal query's time under attack to its time alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def call(srv, path: str, body: bytes | None = None) -> tuple[int, float]:
    host, port = srv.address
    headers = {"Authorization": f"Bearer {srv.token}", "Content-Type": "application/json"}
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=body, headers=headers,
                                 method="POST" if body is not None else "GET")
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        e.read()
        code = e.code
    return code, (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from imgsearch import Library, synthetic
    from imgsearch.config import Settings
    from imgsearch.server import SearchServer

    work = Path(tempfile.mkdtemp(prefix="imgsearch-bench-limits-"))
    model = work / "model"
    synthetic.pretrain_tiny_clip(model, steps=60, seed=0)
    synthetic.generate(work / "photos", per_class=3, size=64, fmt="png", seed=1, captions_file=None)
    settings = Settings.from_env(home=str(work / "home"), model=f"local-dir:{model}", device="cpu")
    with Library(settings=settings) as lib:
        lib.index(work / "photos")
    srv = SearchServer(settings, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    normal = "/api/search?q=a+red+circle&k=5"
    many = json.dumps({"texts": [f"word {i}" for i in range(150_000)]}).encode()
    deep = b"[" * 100_000 + b"]" * 100_000
    call(srv, normal)  # warm
    alone, hostile, beside, nested = [], [], [], []
    for _ in range(args.runs):
        alone.append(call(srv, normal)[1])
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(r=call(srv, "/api/search", many)))
        t.start()
        beside.append(call(srv, normal)[1])
        t.join()
        code, ms = result["r"]
        assert code == 400, code
        hostile.append(ms)
        code, ms = call(srv, "/api/search", deep)
        assert code == 400, code
        nested.append(ms)
    srv.shutdown()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"cpu: {cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    m = statistics.median
    print(f"normal query alone          {m(alone):8.1f} ms")
    print(f"150,000-term POST (400)      {m(hostile):8.1f} ms")
    print(f"normal query beside it      {m(beside):8.1f} ms  ({m(beside) / m(alone):.2f}x alone)")
    print(f"100,000-deep JSON (400)      {m(nested):8.1f} ms")


if __name__ == "__main__":
    main()
