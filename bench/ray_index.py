"""Plain `index` vs `index --ray` (a local Ray on this machine): images/s and Ray's overhead per image.

    python bench/ray_index.py [--n 200] [--size 512] [--model tiny|vitb32] [--cpus N]

Each run indexes the same generated JPEGs into a fresh library with the same loaded model (torch fp32 on
the CPU for both, so only the pipeline differs). Ray's start-up is timed on its own, then two --ray runs:
the first pays for starting the workers and loading the model into the actor, the second shows the
steady state once worker processes exist. On one machine Ray can only add overhead; it pays on a cluster.
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
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=512, help="long side of the generated JPEGs")
    ap.add_argument("--model", choices=("tiny", "vitb32"), default="tiny")
    ap.add_argument("--cpus", type=int, default=0, help="CPUs for the local Ray (default: this machine's cores)")
    args = ap.parse_args()

    from common import make_photos, random_vit_b32

    from imgsearch import distributed, encoder, synthetic
    from imgsearch.config import Settings, cpu_cores
    from imgsearch.encoder import ModelSpec, save_local_dir
    from imgsearch.indexer import index_paths

    tmp = Path(tempfile.mkdtemp(prefix="imgsearch-bench-ray-"))
    ray_dir = None
    try:
        if args.model == "tiny":
            model, cfg = synthetic.build_tiny_clip()
            model_id = f"local-dir:{save_local_dir(model, cfg, tmp / 'model', {'size': 32})}"
        else:
            model_id = random_vit_b32()
        photos = make_photos(tmp / "photos", args.n, args.size, args.size * 3 // 4)
        base = Settings.from_env(model=model_id, pretrained=None, device="cpu", precision="fp32",
                                 image_backend="torch")
        enc = encoder.load(ModelSpec(model_id, None), "cpu", "fp32")
        cpus = args.cpus or cpu_cores()
        print(f"{args.n} JPEGs {args.size}x{args.size * 3 // 4}, model {args.model} (torch fp32, CPU), "
              f"{cpu_cores()} cores, Ray with {cpus} CPUs")

        def run(name: str, remote) -> float:
            settings = base.with_(home=tmp / f"home-{name}")
            t = time.perf_counter()
            report = index_paths(settings, [photos], encoder=enc, remote=remote)
            wall = time.perf_counter() - t
            assert report.encoded == args.n and not report.failed, report.as_dict()
            print(f"  {name:<14} {wall:6.1f} s  {args.n / wall:7.1f} img/s")
            return wall

        plain = run("plain", None)
        t = time.perf_counter()
        ray_dir = distributed.start_local(cpus)
        print(f"  Ray start-up   {time.perf_counter() - t:6.1f} s")
        first = run("ray (cold)", distributed.RayStage(base))
        warm = run("ray (warm)", distributed.RayStage(base))
        print(f"overhead per image vs plain: cold {1000 * (first - plain) / args.n:+.1f} ms, "
              f"warm {1000 * (warm - plain) / args.n:+.1f} ms (Ray start-up not included); "
              f"ray/plain rate: cold {plain / first:.2f}x, warm {plain / warm:.2f}x")
    finally:
        if ray_dir is not None:
            import ray

            ray.shutdown()
            distributed.remove_temp_dir(ray_dir)
        shutil.rmtree(tmp, ignore_errors=True)  # mkdtemp above: everything in it is this run's


if __name__ == "__main__":
    main()
