"""Cold `imgsearch query "a red car"`: whole fresh processes, median wall time and peak RSS, optionally vs rclip.

    python bench/cold_query.py [--photos 300] [--runs 7] [--rclip]

Uses ViT-B-32-256 with random weights (torch.manual_seed(0); open_clip.create_model("ViT-B-32-256")) saved
as a local-dir model, indexes a folder of 1024x768 JPEGs once (which also writes the text export), then
times N fresh `imgsearch query --no-server` processes. Peak RSS is the kernel's ru_maxrss of the child
(same as /usr/bin/time %M). With --rclip, /work/shared/peers/rclip_bench.sh times rclip's cold
queries on the same photos afterwards (scratch under $PEERS, default /tmp/peers) and the ratios are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_photos, peak_child  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("PEERS", "/tmp/peers"))
SHARED = Path(os.environ.get("PEERS_DIR", ROOT.parent / "shared" / "peers"))  # the rclip harness beside the repo


def vit_b32_256(folder: Path) -> str:
    if not (folder / "open_clip_model.safetensors").exists():
        import open_clip
        import torch

        sys.path.insert(0, str(ROOT))
        from imgsearch.encoder import save_local_dir

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32-256")
        save_local_dir(model, open_clip.get_model_config("ViT-B-32-256"), folder)
    return f"local-dir:{folder.resolve()}"


def one_run(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall time and this child's own peak RSS (measured by a tiny wrapper so earlier children don't count)."""
    rc, rss, wall, _, err = peak_child(cmd, env)
    if rc != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err.decode(errors='replace')[-2000:]}")
    return wall, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=300)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "imgsearch-bench-cold")
    ap.add_argument("--query", default="a red car")
    ap.add_argument("--rclip", action="store_true", help="also time rclip (needs its harness under $PEERS)")
    args = ap.parse_args()

    work = args.work
    model = vit_b32_256(work / "vit-b-32-256")
    photos = make_photos(work / "photos", args.photos, 1024, 768)
    home = work / "home"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in [k for k in env if k.startswith("IMGSEARCH_")]:
        del env[k]
    base = [sys.executable, "-m", "imgsearch", "--home", str(home), "--model", model]
    if not (home / "library.db").exists() or not any((home / "exports").glob("*/text/manifest.json")):
        print(f"indexing {args.photos} photos (once) ...", file=sys.stderr)
        subprocess.run(base + ["index", str(photos), "-q"], env=env, check=True)
    query = base + ["query", "--no-server", args.query]

    one_run(query, env)  # warm the page cache: every timed run is "cold process, warm disk cache"
    runs = [one_run(query, env) for _ in range(args.runs)]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"cpu: {cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    walls, rss = [w for w, _ in runs], [r for _, r in runs]
    mine = (statistics.median(walls), max(rss))
    print(f"imgsearch query_s_median={mine[0]:.3f} min={min(walls):.3f} max={max(walls):.3f} "
          f"peak_rss_mb={mine[1]:.0f} runs={len(runs)}")
    if args.rclip:
        # rclip's own harness (its venv, random ONNX export, index of the same photos, 5 cold queries).
        proc = subprocess.run(["bash", str(SHARED / "rclip_bench.sh"), str(photos), "cold_query"],
                              env=dict(env, PEERS=str(PEERS)), capture_output=True, text=True)
        last = ([ln for ln in proc.stdout.splitlines() if ln.startswith("rclip ")] or [""])[-1]  # its summary line
        fields = dict(f.split("=", 1) for f in last.split()[1:] if "=" in f)
        if proc.returncode != 0 or "query_s_median" not in fields:
            print(f"rclip bench failed: {proc.stderr[-500:]}", file=sys.stderr)
            return
        wr, rr = float(fields["query_s_median"]), float(fields["query_peak_rss_mb"])
        print(f"rclip query_s_median={wr:.3f} peak_rss_mb={rr:.0f}")
        print(f"ratio imgsearch/rclip: wall {mine[0] / wr:.2f}x (target <= 0.5), peak RSS {mine[1] / rr:.2f}x "
              "(target <= 1)")


if __name__ == "__main__":
    main()
