"""Watch latency: seconds from a photo landing in a watched folder to a search that returns it.

    python bench/watch_latency.py [--n 20] [--poll] [--interval 1.0] [--debounce 0.5] [--vitb32]

A Library watcher runs in a thread (as `serve --watch` runs it). Each photo is written under a temporary
name and renamed into its own subfolder (as cameras and copy tools do); the clock stops when a warm search
restricted to that subfolder returns it, so the time covers the event, the quiet spell (--debounce), the
stability check, hashing, decoding, encoding, the SQLite batch and the FAISS index reload. Photos arrive
one at a time. The default model is the tests' tiny CLIP shape (the encode is not what this measures);
--vitb32 uses a random-weight ViT-B-32 and 1 MP photos for the real encode cost on this machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--poll", action="store_true", help="the polling observer instead of native events")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --poll")
    ap.add_argument("--debounce", type=float, default=0.5)
    ap.add_argument("--vitb32", action="store_true")
    args = ap.parse_args()

    import random

    from imgsearch import Library, synthetic

    tmp = Path(tempfile.mkdtemp(prefix="imgsearch-bench-watch-"))
    try:
        photos = tmp / "photos"
        synthetic.generate(photos, per_class=1, size=96, fmt="jpg", seed=0, captions_file=None)
        if args.vitb32:
            from common import make_photos, random_vit_b32

            model = random_vit_b32()
            sources = sorted(make_photos(tmp / "sources", args.n, 1200, 900).glob("*.jpg"))
        else:
            from imgsearch.encoder import save_local_dir

            m, cfg = synthetic.build_tiny_clip()
            model = f"local-dir:{save_local_dir(m, cfg, tmp / 'model', {'size': 32})}"
            rng = random.Random(1)
            (tmp / "sources").mkdir()
            sources = []
            for i in range(args.n):
                p = tmp / "sources" / f"{i:03d}.jpg"
                synthetic.draw_shape(rng.choice(list(synthetic.COLORS)), rng.choice(synthetic.SHAPES), 96,
                                     rng).save(p, quality=92)
                sources.append(p)

        lib = Library(home=tmp / "home", model=model, device="cpu", precision="fp32")
        watcher = lib.watcher([photos], poll=args.poll, interval=args.interval, debounce=args.debounce)
        watcher.start()
        t = time.perf_counter()
        report = watcher.catch_up()
        print(f"catch-up: {report.new} photos in {time.perf_counter() - t:.1f}s (model load included); "
              f"watching with {watcher.how}, debounce {args.debounce:g}s")
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
        thread.start()
        lib.search("warm up", k=1)

        latencies = []
        for i, src in enumerate(sources):
            folder = photos / f"new_{i:03d}"
            folder.mkdir()
            part = folder / ".incoming.jpg.part"
            shutil.copyfile(src, part)
            t0 = time.perf_counter()
            part.rename(folder / "photo.jpg")
            while not lib.search("a photo", k=1, under=folder):
                if time.perf_counter() - t0 > 60:
                    raise SystemExit(f"photo {i} not searchable after 60 s")
                time.sleep(0.01)
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.2)  # photos arrive one at a time, not as one burst
        stop.set()
        thread.join(30)
        lib.close()
        q = statistics.quantiles(latencies, n=20, method="inclusive")
        print(f"write -> searchable over {len(latencies)} photos: median {statistics.median(latencies):.2f}s, "
              f"p95 {q[18]:.2f}s, min {min(latencies):.2f}s, max {max(latencies):.2f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
