"""Peak memory of building a model's FAISS index from the library (SQLite), streamed vs loaded whole.

    python bench/build_memory.py [--n 500000] [--budget-mb 64]

Writes N synthetic clustered 512-d vectors into a fresh library, then builds the index twice, each in a
fresh child process so that its peak RSS is its own: the library's streaming build (`model_index`: ids,
a training sample and one chunk at a time) and the baseline of loading every vector into one matrix
first (what the library did before). A small `--budget-mb` makes the index IVF-PQ, as it would be at
millions of images, so the index itself is small and the difference is the vectors held during the build.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scale import clustered_blocks  # noqa: E402


def rss_kb() -> int:
    """Resident memory now (ru_maxrss is the high-water mark, which imports may already have set)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def child(home: str, mode: str, budget_mb: int) -> None:
    from imgsearch.config import Settings
    from imgsearch.indexcache import index_policy, model_index
    from imgsearch.store import Store
    from imgsearch.vectors import VectorIndex

    settings = Settings(home=Path(home), index_budget_mb=budget_mb)
    store = Store(settings.db_path, create=False)
    model = store.models()[0]
    base = rss_kb()
    t = time.perf_counter()
    if mode == "stream":
        settings.index_path(model.id).unlink(missing_ok=True)
        index, _, action = model_index(settings, store, model.id)
        assert action == "rebuilt"
    else:
        ids, vecs = store.load_vectors(model.id)
        index = VectorIndex.build(ids, vecs, model.dim, index_policy(settings))
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_mb": peak / 1024, "growth_mb": (peak - base) / 1024,
                      "kind": index.kind, "recall": index.recall, "index_mb": index.nbytes / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--budget-mb", type=int, default=64)
    ap.add_argument("--child", nargs=2, metavar=("HOME", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.budget_mb)

    from imgsearch.config import Settings
    from imgsearch.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="imgsearch-bench-mem-"))
    try:
        settings = Settings(home=tmp)
        settings.home.mkdir(parents=True, exist_ok=True)
        store = Store(settings.db_path)
        model = store.get_or_create_model("bench", None, "synthetic", args.dim)
        t = time.perf_counter()
        start = 0
        for block in clustered_blocks(args.n, args.dim, block=20_000):
            paths = [f"/bench/{i:08d}.jpg" for i in range(start, start + len(block))]
            store.write_batch(model.id, new=[{"path": p, "size": 1, "mtime_ns": 0, "hash": p} for p in paths],
                              vectors=list(zip(paths, block)))
            start += len(block)
        store.close()
        print(f"library: {args.n:,} vectors of {args.dim} floats ({args.n * args.dim * 4 / 2**20:,.0f} MB raw) "
              f"written in {time.perf_counter() - t:.0f} s", flush=True)
        got = {}
        for mode in ("whole", "stream"):
            out = subprocess.run([sys.executable, __file__, "--budget-mb", str(args.budget_mb), "--child", str(tmp),
                                  mode], check=True, capture_output=True, text=True).stdout
            got[mode] = r = json.loads(out.strip().splitlines()[-1])
            print(f"{mode:>6}: {r['kind']:<12} build {r['seconds']:6.1f} s | peak RSS {r['peak_mb']:7.0f} MB "
                  f"(+{r['growth_mb']:.0f} MB during the build) | index {r['index_mb']:.0f} MB | "
                  f"recall@10 {r['recall']:.3f}", flush=True)
        print(f"streamed/whole: peak RSS ratio {got['stream']['peak_mb'] / got['whole']['peak_mb']:.2f}, build-time "
              f"ratio {got['stream']['seconds'] / got['whole']['seconds']:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
