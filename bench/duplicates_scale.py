"""How `imgsearch duplicates` scales: candidate search + grouping time vs library size.

Synthetic clustered unit vectors (CLIP-like: many images near a few thousand topics) with planted
near-copies. Prints, per N: IVF time (what the command uses above dupes.EXACT_MAX), exact flat time
(all-pairs work, for comparison), recall of the planted copies, then the log-log slope and an
extrapolation to 1M images. The pixel check runs only on candidate images, so it is timed per pair.

    .venv/bin/python bench/duplicates_scale.py                 # 5k..100k, exact up to 50k
    .venv/bin/python bench/duplicates_scale.py --sizes 2000 8000 --exact-max 8000
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np


def clustered(n: int, dim: int, topics: int, planted_frac: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, topics, n)] + rng.normal(scale=0.6 / math.sqrt(dim), size=(n, dim)).astype(np.float32)
    n_pairs = int(n * planted_frac)
    pairs = rng.choice(n, size=(n_pairs, 2), replace=False)
    x[pairs[:, 1]] = x[pairs[:, 0]] + rng.normal(scale=0.15 / math.sqrt(dim), size=(n_pairs, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), {tuple(sorted(p)) for p in pairs.tolist()}


def run(x, exact: bool, threshold: float):
    from imgsearch import dupes

    t = time.perf_counter()
    pairs = dupes.candidate_pairs(x, threshold, exact=exact)
    uf = dupes.UnionFind(len(x))
    for a, b, _ in pairs:
        uf.union(a, b)
    groups = uf.groups()
    return time.perf_counter() - t, pairs, groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5_000, 10_000, 20_000, 50_000, 100_000])
    ap.add_argument("--exact-max", type=int, default=50_000, help="skip flat search above this N")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threshold", type=float, default=0.90)
    args = ap.parse_args()

    import faiss

    from imgsearch import dupes

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, dim {args.dim}, "
          f"threshold {args.threshold}, k={dupes.NEIGHBOURS}, nprobe={dupes.NPROBE}")
    print(f"{'N':>8}  {'ivf s':>8}  {'exact s':>8}  {'recall':>6}  {'pairs':>8}  {'groups':>7}  {'nn cos':>7}")
    ivf_times, exact_times = [], []
    for n in args.sizes:
        x, planted = clustered(n, args.dim, topics=max(50, n // 100), planted_frac=0.01)
        t_ivf, pairs, groups = run(x, False, args.threshold)
        found = {(a, b) for a, b, _ in pairs}
        recall = len(planted & found) / max(1, len(planted))
        t_exact = float("nan")
        if n <= args.exact_max:
            t_exact, _, _ = run(x, True, args.threshold)
        ivf_times.append((n, t_ivf))
        exact_times.append((n, t_exact))
        # median similarity of an image to its closest non-copy neighbour: how far below the threshold
        # the crowd sits (CLIP photo libraries: ~0.7-0.85)
        nn = float(np.median(np.sort(x[:200] @ x.T, axis=1)[:, -3]))
        print(f"{n:>8}  {t_ivf:8.2f}  {t_exact:8.2f}  {recall:6.3f}  {len(pairs):>8}  {len(groups):>7}  {nn:7.3f}",
              flush=True)
    if len(ivf_times) >= 2:
        ns = np.log([n for n, _ in ivf_times[-3:]])
        ts = np.log([t for _, t in ivf_times[-3:]])
        slope = float(np.polyfit(ns, ts, 1)[0])
        n_last, t_last = ivf_times[-1]
        print(f"IVF log-log slope over the largest sizes: {slope:.2f} (2.0 would be all pairs)")
        exact = [(n, t) for n, t in exact_times if not math.isnan(t)]
        for target in (1_000_000, 10_000_000):
            line = (f"extrapolated to {target:,}: IVF {t_last * (target / n_last) ** slope / 60:.1f} min at the "
                    f"measured slope, {t_last * (target / n_last) ** 1.5 / 60:.1f} min at the model's N^1.5")
            if exact:
                ne, te = exact[-1]
                line += f"; exact all-pairs search {te * (target / ne) ** 2 / 3600:.1f} h"
            print(line)

    # The pixel check: per candidate pair, given cached fingerprints (decode cost is per image, once).
    from PIL import Image

    im = Image.effect_noise((512, 512), 50).convert("RGB")
    fp = dupes.unpack(dupes.fingerprint(im))  # find_duplicates unpacks each image's fingerprint once
    fp2 = dupes.unpack(dupes.fingerprint(im.resize((300, 300))))
    t = time.perf_counter()
    for _ in range(2000):
        dupes.match_score(fp, fp2)
    per_pair = (time.perf_counter() - t) / 2000
    t = time.perf_counter()
    for _ in range(50):
        dupes.fingerprint(im)
    per_image = (time.perf_counter() - t) / 50
    print(f"pixel check: {per_pair * 1e6:.0f} us per candidate pair; fingerprint {per_image * 1e3:.2f} ms per "
          "decoded 512px image (plus decoding, once per candidate image, cached)")


if __name__ == "__main__":
    main()
