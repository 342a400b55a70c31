"""Re-running `index` on an unchanged folder: time for N files (nothing is re-encoded), vs the first run.

    python bench/incremental.py [--n 10000]

Uses a tiny random-weight CLIP (the encode cost is not what this measures) and small generated images.
Target: an unchanged 10k-file folder re-indexes in seconds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    args = ap.parse_args()

    import random

    from imgsearch import synthetic
    from imgsearch.config import Settings
    from imgsearch.encoder import save_local_dir
    from imgsearch.indexer import index_paths

    tmp = Path(tempfile.mkdtemp(prefix="imgsearch-bench-inc-"))
    try:
        model, cfg = synthetic.build_tiny_clip()
        model_dir = save_local_dir(model, cfg, tmp / "model", {"size": 32})
        photos = tmp / "photos"
        rng = random.Random(0)
        colors, shapes = list(synthetic.COLORS), synthetic.SHAPES
        for i in range(args.n):
            sub = photos / f"{i // 500:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            synthetic.draw_shape(rng.choice(colors), rng.choice(shapes), 48, rng).save(sub / f"{i:06d}.png")
        settings = Settings.from_env(home=tmp / "home", model=f"local-dir:{model_dir}", device="cpu",
                                     precision="fp32", batch_size=64)
        first = index_paths(settings, [photos])
        t = time.perf_counter()
        again = index_paths(settings, [photos])
        rerun = time.perf_counter() - t
        assert again.encoded == 0 and again.unchanged == args.n, again.as_dict()
        for p in list(photos.rglob("*.png"))[:100]:
            p.touch()
        t = time.perf_counter()
        touched = index_paths(settings, [photos])
        touched_s = time.perf_counter() - t
        print(f"{args.n} files: first run {first.seconds:.1f} s ({first.encoded} encoded) | unchanged re-run "
              f"{rerun:.2f} s ({args.n / rerun:,.0f} files/s, 0 encoded) | 100 touched files {touched_s:.2f} s "
              f"({touched.encoded} encoded)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
