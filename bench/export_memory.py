"""Peak memory and speed of `imgsearch export` on a large library, streamed vs loading every vector first.

    python bench/export_memory.py [--n 200000] [--dim 512]

Writes N synthetic unit-length vectors (with image rows) into a fresh library, then exports it in each
form, each in a fresh child process so that its peak RSS is its own: `parquet` and `clip-retrieval`
(Library.export: one chunk of rows at a time) and the baseline of loading every vector and path into
memory and writing one table (what a naive export does). `ready` is the RSS of a child that has opened
the library and imported pyarrow, before exporting: the growth over it is what the export itself holds.
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


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def child(home: str, mode: str, out: str) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    import imgsearch

    lib = imgsearch.Library(home, "bench", None)
    store = lib.store
    model = store.models()[0]
    ready = rss_kb()
    t = time.perf_counter()
    if mode == "whole":
        ids, vecs = store.load_vectors(model.id)
        rows = store.get_images(ids)
        table = pa.table({"id": pa.array(ids), "path": pa.array([rows[i].path for i in ids.tolist()]),
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), model.dim)})
        Path(out).mkdir()
        pq.write_table(table, Path(out) / "all.parquet")
        n = len(ids)
    else:
        report = lib.export(out, mode, model="bench")
        n = report.rows
        if mode == "clip-retrieval":
            emb = np.load(Path(out) / "img_emb" / "img_emb_0.npy", mmap_mode="r")
            assert emb.shape == (n, model.dim) and emb.dtype == np.float32
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    print(json.dumps({"mode": mode, "rows": n, "seconds": seconds, "ready_mb": ready / 1024, "peak_mb": peak / 1024,
                      "growth_mb": (peak - ready) / 1024, "out_mb": size / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--child", nargs=3, metavar=("HOME", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    import numpy as np

    from imgsearch.config import Settings
    from imgsearch.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="imgsearch-bench-export-"))
    try:
        settings = Settings(home=tmp / "home")
        settings.home.mkdir(parents=True)
        store = Store(settings.db_path)
        model = store.get_or_create_model("bench", None, "synthetic", args.dim)
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        for start in range(0, args.n, 20_000):
            block = rng.standard_normal((min(20_000, args.n - start), args.dim), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            paths = [f"/bench/photos/{i // 1000:04d}/{i:08d}.jpg" for i in range(start, start + len(block))]
            store.write_batch(model.id, new=[{"path": p, "size": 1000 + i, "mtime_ns": i, "hash": f"{i:032x}",
                                              "width": 640, "height": 480} for i, p in enumerate(paths, start)],
                              vectors=list(zip(paths, block)))
        store.close()
        raw = args.n * args.dim * 4 / 2**20
        print(f"library: {args.n:,} vectors of {args.dim} floats ({raw:,.0f} MB raw) written in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        got = {}
        for mode in ("whole", "parquet", "clip-retrieval"):
            out = tmp / f"out-{mode}"
            proc = subprocess.run([sys.executable, __file__, "--child", str(settings.home), mode, str(out)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{mode} failed:\n{proc.stderr}")
            got[mode] = r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{mode:>14}: {r['rows']:,} rows in {r['seconds']:6.1f} s ({r['rows'] / r['seconds']:,.0f} rows/s) "
                  f"| peak RSS {r['peak_mb']:6.0f} MB (+{r['growth_mb']:.0f} MB over {r['ready_mb']:.0f} MB ready) "
                  f"| files {r['out_mb']:,.0f} MB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        for mode in ("parquet", "clip-retrieval"):
            print(f"{mode} / whole: peak RSS ratio {got[mode]['peak_mb'] / got['whole']['peak_mb']:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
