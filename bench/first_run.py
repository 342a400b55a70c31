"""A user's first `imgsearch index` (fresh home, no exports) and a later one, against rclip, whole processes.

    nice python bench/first_run.py [--n 300] [--rounds 2] [--no-rclip] [--precision auto]
                                   [--python VENV/bin/python --local-dir]

The issue-23 setting: 1 MP JPEGs, random ViT-B-32-256 weights saved as a plain safetensors checkpoint
(`--model ViT-B-32-256 --pretrained weights.safetensors`), the default image backend and precision. --local-dir
gives the same weights as a model folder (config, weights, merges.txt: what a hub tag resolves to, and what an
install without open_clip reads); --python runs imgsearch (this checkout) on another environment, e.g. the default
install's, which has no torch. Per round,
alternating (A B A B) to cancel drift:
- first: `imgsearch index` into a new, empty home: imports, model, exports and the encode loop all count;
- later: `imgsearch index` of another N photos into the same library (a user's next run: the exports and
  any measurement or parity verdict the first run recorded are there);
- rclip 3.3 through ../shared/peers/rclip_bench.sh (same photos, same architecture, random weights).
Each imgsearch process is sampled from /proc (the process and its children) for peak summed RSS. Prints
img/s, peak RSS and the ratios against rclip from the same round, and names the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import make_photos

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("PEERS_DIR", ROOT.parent / "shared" / "peers"))


def random_checkpoint(path: Path) -> Path:
    """torch.manual_seed(0); open_clip.create_model("ViT-B-32-256"), its state dict as one safetensors file."""
    if not path.exists():
        code = ("import sys, torch, open_clip; from safetensors.torch import save_file; torch.manual_seed(0); "
                "m = open_clip.create_model('ViT-B-32-256'); "
                "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[1])")
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    return path


def model_folder(checkpoint: Path) -> Path:
    """``checkpoint`` as a local-dir model: open_clip's ViT-B-32-256 config, the weights, CLIP's BPE merges."""
    folder = checkpoint.with_suffix("")
    if not (folder / "merges.txt").exists():
        folder.mkdir(exist_ok=True)
        code = ("import json, sys, open_clip; from pathlib import Path; from imgsearch.bpe import read_merges; "
                "d = Path(sys.argv[1]); (d / 'open_clip_config.json').write_text(json.dumps("
                "{'model_cfg': open_clip.get_model_config('ViT-B-32-256'), 'preprocess_cfg': {}})); "
                "(d / 'merges.txt').write_text('#version: 0.2\\n' + '\\n'.join(read_merges("
                "open_clip.tokenizer.default_bpe())) + '\\n')")
        subprocess.run([sys.executable, "-c", code, str(folder)], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        (folder / "open_clip_model.safetensors").symlink_to(checkpoint)
    return folder


def _tree_rss(root: int) -> int:
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    stack += [int(x) for x in f.read().split()]
        except OSError:
            pass
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def run_index(home: Path, model: list[str], photos: Path, precision: str, python: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), IMGSEARCH_HOME=str(home))
    cmd = [python, "-m", "imgsearch", *model, "--precision", precision, "index", str(photos), "--json", "--quiet"]
    peak = 0
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, _tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"imgsearch index failed: {err.strip()[-800:]}")
    rep = json.loads(out[out.index("{"):])
    n = rep["encoded"]
    return {"img_s": n / wall, "wall_s": wall, "rss_mb": peak / 2**20, "n": n, "tower": rep["image_tower"]}


def run_rclip(photos: Path) -> tuple[float, float]:
    env = dict(os.environ, WAIT_IDLE=os.environ.get("WAIT_IDLE", "0"), NQ="1")
    out = subprocess.run(["bash", str(PEERS / "rclip_bench.sh"), str(photos), "first-run"], env=env,
                         capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("rclip ")]
    if out.returncode or not line:
        raise SystemExit(f"rclip bench failed: {(out.stderr or out.stdout)[-800:]}")
    fields = dict(re.findall(r"(\w+)=([\d.]+)", line[-1]))
    return float(fields["index_img_per_s"]), float(fields["index_peak_rss_mb"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--no-rclip", action="store_true")
    ap.add_argument("--python", default=sys.executable, help="the environment imgsearch runs on")
    ap.add_argument("--local-dir", action="store_true", help="the weights as a local-dir model folder")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "imgsearch-first-run"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    photos = make_photos(work / f"photos-{args.n}", args.n, 1024, 768)
    more = make_photos(work / f"photos-{args.n}-more", args.n, 1024, 768, seed=1)
    checkpoint = random_checkpoint(work / "vit-b-32-256-random.safetensors")
    model = (["--model", f"local-dir:{model_folder(checkpoint)}"] if args.local_dir
             else ["--model", "ViT-B-32-256", "--pretrained", str(checkpoint)])
    from imgsearch.onnx_image import cpu_model

    torch = subprocess.run([args.python, "-c", "import torch"], capture_output=True).returncode == 0
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; {args.n} photos 1024x768; precision {args.precision}; "
          f"{args.python} ({'with' if torch else 'without'} torch); {' '.join(model)}")
    rows: dict[str, list[dict]] = {"first": [], "later": []}
    rclip: list[tuple[float, float]] = []
    for r in range(args.rounds):
        home = Path(tempfile.mkdtemp(prefix="first-run-", dir=work))
        try:
            rows["first"].append(run_index(home, model, photos, args.precision, args.python))
            rows["later"].append(run_index(home, model, more, args.precision, args.python))
        finally:
            shutil.rmtree(home, ignore_errors=True)  # the bench's own temporary home
        for kind in rows:
            x = rows[kind][-1]
            print(f"round {r + 1} {kind:5s} {x['img_s']:.2f} img/s ({x['wall_s']:.1f} s), peak RSS {x['rss_mb']:.0f} MB, {x['tower']}",
                  flush=True)
        if not args.no_rclip:
            rclip.append(run_rclip(photos))
            print(f"round {r + 1} rclip {rclip[-1][0]:.2f} img/s, peak RSS {rclip[-1][1]:.0f} MB", flush=True)
    print("\nmedians:")
    rc = (statistics.median(x[0] for x in rclip), statistics.median(x[1] for x in rclip)) if rclip else None
    for kind, xs in rows.items():
        ips, rss = statistics.median(x["img_s"] for x in xs), statistics.median(x["rss_mb"] for x in xs)
        vs = f" = {ips / rc[0]:.2f}x rclip's speed, {rss / rc[1]:.2f}x its RSS" if rc else ""
        print(f"  {kind:5s} index {ips:.2f} img/s, peak RSS {rss:.0f} MB{vs}")
    if rc:
        print(f"  rclip index {rc[0]:.2f} img/s, peak RSS {rc[1]:.0f} MB")


if __name__ == "__main__":
    main()
