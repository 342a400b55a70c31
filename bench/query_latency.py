"""Query latency: warm in-process and in-server, and whole-process cold `imgsearch query` with and without
a running server, at 10k and 100k library images.

    python bench/query_latency.py [--sizes 10000 100000] [--queries 50] [--cold-runs 5]

Vectors are synthetic (clustered, normalised); the text encoder is a random-weight ViT-B-32 so the encode
cost is real. Targets: warm p50 under 100 ms at 100k (in-server under 50 ms); a cold `imgsearch query`
with a server running under 0.5 s wall. The rclip reference (a cold text query, whole process, same
machine kind) is 1.1 s; ratios below are against it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import urllib.request
import statistics
import tempfile
import time
from pathlib import Path

from common import random_vit_b32


def build_library(home: Path, photos: Path, n: int, enc) -> None:
    import numpy as np

    from imgsearch.store import Store

    store = Store(home / "library.db")
    model = store.get_or_create_model(enc.spec.name, enc.spec.pretrained, enc.fingerprint, enc.dim)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(256, enc.dim)).astype("f4")
    photos.mkdir(parents=True, exist_ok=True)
    step = 5000
    for start in range(0, n, step):
        count = min(step, n - start)
        vecs = centers[rng.integers(0, 256, count)] + 0.3 * rng.normal(size=(count, enc.dim)).astype("f4")
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        new = []
        for i in range(start, start + count):
            p = photos / f"{i:07d}.jpg"
            p.touch()
            new.append({"path": str(p), "size": 0, "mtime_ns": 0, "hash": f"h{i}", "width": 640, "height": 480})
        store.write_batch(model.id, new=new, vectors=list(zip((d["path"] for d in new), vecs)))
    store.close()


RCLIP_COLD_S = 1.1  # rclip's cold text query on this machine kind (issue 6), whole process


def in_server(settings, words, queries: int) -> list[float]:
    """Warm latency of GET /api/search against an in-process server (HTTP + JSON included)."""
    from imgsearch.server import SearchServer

    srv = SearchServer(settings, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    host, port = srv.address
    out = []
    try:
        for i in range(queries + 1):
            q = (words[i % len(words)] + f" {i}").replace(" ", "+")
            t0 = time.perf_counter()
            req = urllib.request.Request(f"http://{host}:{port}/api/search?q={q}&k=10",
                                         headers={"Authorization": f"Bearer {srv.token}"})
            with urllib.request.urlopen(req, timeout=60) as r:
                json.loads(r.read())
            if i:
                out.append((time.perf_counter() - t0) * 1000)
    finally:
        srv.shutdown()
        t.join(10)
    return out


def cold(settings, model: str, runs: int) -> None:
    """Whole-process wall time of `imgsearch query`, with a server running and without one."""
    exe = [sys.executable, "-m", "imgsearch", "--home", str(settings.home), "--model", model, "--device", "cpu"]

    def timed(extra: list[str]) -> float:
        best = []
        for i in range(runs):
            t0 = time.perf_counter()
            subprocess.run(exe + ["query", f"a red car {i}", "-k", "5"] + extra, check=True, capture_output=True)
            best.append(time.perf_counter() - t0)
        return statistics.median(best)

    no_server = timed(["--no-server"])
    srv = subprocess.Popen(exe + ["serve", "--port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (settings.home / "server.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        with_server = timed([])
    finally:
        srv.terminate()
        srv.wait(30)
    print(f"cold `imgsearch query` (whole process, median of {runs}): with a server {with_server:.2f} s "
          f"({with_server / RCLIP_COLD_S:.2f}x rclip's {RCLIP_COLD_S} s), without {no_server:.2f} s "
          f"({no_server / RCLIP_COLD_S:.2f}x rclip)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--cold-runs", type=int, default=5)
    args = ap.parse_args()

    from imgsearch import Library, encoder
    from imgsearch.config import Settings
    from imgsearch.request import SearchRequest

    model = random_vit_b32()
    enc = encoder.load(encoder.ModelSpec(model), "cpu", "auto")
    words = ["a red car", "a dog on the beach", "mountains at sunset", "birthday cake", "a cat asleep",
             "snow in the city", "a bowl of soup", "people dancing", "an old bridge", "a green field"]
    for n in args.sizes:
        tmp = Path(tempfile.mkdtemp(prefix="imgsearch-bench-q-"))
        try:
            build_library(tmp / "home", tmp / "photos", n, enc)
            settings = Settings.from_env(home=tmp / "home", model=model, device="cpu")
            lib = Library(settings=settings)
            s = lib._warm()  # the Library's one Searcher: its text encoder and vector index, timed apart
            t = time.perf_counter()
            s.index()
            load_ms = (time.perf_counter() - t) * 1000
            lib.search("warm up")
            total, search_only = [], []
            for i in range(args.queries):
                q = SearchRequest.build(words[i % len(words)] + f" {i}")
                t = time.perf_counter()
                vec = s.query_vector(q)
                t1 = time.perf_counter()
                s.search_vector(vec, 10)
                t2 = time.perf_counter()
                total.append((t2 - t) * 1000)
                search_only.append((t2 - t1) * 1000)
            total.sort()
            server_lat = in_server(settings, words, args.queries)
            p95 = total[int(0.95 * len(total)) - 1]
            print(f"{n:>7} images: query p50 {statistics.median(total):6.1f} ms, p95 {p95:6.1f} ms"
                  f" (search+metadata p50 {statistics.median(search_only):5.1f} ms; first index load {load_ms:.0f} ms)"
                  f" | through the HTTP server p50 {statistics.median(server_lat):6.1f} ms")
            lib.close()
            if n == args.sizes[0] and args.cold_runs:
                cold(settings, model, args.cold_runs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
