"""Peak memory and speed of `imgsearch export` on a large library, streamed vs loading every vector first;
with --onnx, of the ONNX image export instead: traced by torch.onnx.export vs written by clipgraph.

    python bench/export_memory.py [--n 200000] [--dim 512]
    python bench/export_memory.py --onnx [--rounds 2] [--threads 2] [--trace-root DIR]

Writes N synthetic unit-length vectors (with image rows) into a fresh library, then exports it in each
form, each in a fresh child process so that its peak RSS is its own: `parquet` and `clip-retrieval`
(Library.export: one chunk of rows at a time) and the baseline of loading every vector and path into
memory and writing one table (what a naive export does). `ready` is the RSS of a child that has opened
the library and imported pyarrow, before exporting: the growth over it is what the export itself holds.
"""

from __future__ import annotations

import argparse
import importlib.util
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


def onnx_child(model: str, mode: str, out: str, root: str) -> None:
    """Load the model (fp32, CPU) as an index run does, then write its fp32 image export to ``out``: by
    clipgraph (mode "graph") or traced, the path a tower clipgraph refuses takes ("trace"). ``root``: the
    imgsearch checkout to run (an older one traces with whatever that one did)."""
    sys.path.insert(0, root)
    from imgsearch import onnx_image
    from imgsearch.encoder import ModelSpec, build

    enc = build(ModelSpec(model), "cpu", "fp32")
    if mode == "trace" and importlib.util.find_spec("imgsearch.clipgraph"):
        from imgsearch import clipgraph

        def refuse(*a):
            raise clipgraph.Unsupported("bench: traced")

        clipgraph.model_facts = refuse
    ready = rss_kb()
    t = time.perf_counter()
    onnx_image._export(enc, Path(out))
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "seconds": seconds, "ready_mb": ready / 1024, "peak_mb": peak / 1024,
                      "growth_mb": (peak - ready) / 1024}))


def onnx_main(args) -> None:
    """Export time and peak RSS per writer (fresh child processes, alternating), then, in this one process,
    onnxruntime fp32 and int8 img/s of both files (same session settings, alternating) and int8 parity."""
    import numpy as np
    import torch

    from bench.common import random_vit_b32
    from imgsearch import onnx_image
    from imgsearch.encoder import ModelSpec, build

    model = random_vit_b32()
    tmp = Path(tempfile.mkdtemp(prefix="imgsearch-bench-onnx-"))
    roots = {"trace": args.trace_root, "graph": str(Path(__file__).resolve().parents[1])}
    try:
        runs = {m: [] for m in roots}
        for _ in range(args.rounds):
            for mode, root in roots.items():
                cmd = [sys.executable, __file__, "--onnx-child", model, mode, str(tmp / f"{mode}.onnx"), root]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{mode} failed:\n{proc.stderr[-2000:]}")
                runs[mode].append(r := json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"{mode:>6}: export {r['seconds']:5.1f} s | peak RSS {r['peak_mb']:5.0f} MB "
                      f"(+{r['growth_mb']:.0f} MB over {r['ready_mb']:.0f} MB with the model loaded)", flush=True)
        sessions = {}
        for mode in roots:
            onnx_image._quantise_int8(tmp / f"{mode}.onnx", tmp / f"{mode}-int8.onnx")
            for kind in ("fp32", "int8"):
                path = tmp / (f"{mode}.onnx" if kind == "fp32" else f"{mode}-int8.onnx")
                sessions[mode, kind] = onnx_image.OrtImageTower(path, kind, args.threads)
        enc = build(ModelSpec(model), "cpu", "fp32")
        probe = onnx_image.probe_batch(enc.image_size, 16)
        ref = enc.encode_image_tensors(torch.from_numpy(probe))
        rates = {key: [] for key in sessions}
        for _ in range(args.rounds):
            for key, tower in sessions.items():
                rates[key].append(onnx_image._timed(tower.encode, probe))
        for (mode, kind), tower in sessions.items():
            cos = float((tower.encode(probe) * ref).sum(1).min())
            print(f"{mode:>6} {kind}: {max(rates[mode, kind]):5.1f} img/s (best of {args.rounds}, batch "
                  f"{len(probe)}, {args.threads} threads) | min cosine to torch {cos:.4f} | file "
                  f"{(tmp / (f'{mode}.onnx' if kind == 'fp32' else f'{mode}-int8.onnx')).stat().st_size / 2**20:.0f} MB")
        for kind in ("fp32", "int8"):
            print(f"graph / trace {kind}: {max(rates['graph', kind]) / max(rates['trace', kind]):.2f}x img/s")
        t = {m: np.median([r["seconds"] for r in runs[m]]) for m in runs}
        g = {m: np.median([r["growth_mb"] for r in runs[m]]) for m in runs}
        print(f"graph / trace export: {t['graph'] / t['trace']:.2f}x time, {g['graph'] / max(g['trace'], 1):.2f}x "
              "peak RSS growth")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--onnx", action="store_true", help="the ONNX image export of a random ViT-B-32 instead")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trace-root", default=str(Path(__file__).resolve().parents[1]),
                    help="imgsearch checkout whose tracer is the baseline (default: this one's fallback)")
    ap.add_argument("--child", nargs=3, metavar=("HOME", "MODE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--onnx-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    if args.onnx_child:
        return onnx_child(*args.onnx_child)
    if args.onnx:
        return onnx_main(args)

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
