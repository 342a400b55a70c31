"""Helpers shared by the bench scripts: a random-weight ViT-B-32 saved as a local-dir model, photo folders."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_vit_b32(folder: str | os.PathLike | None = None) -> str:
    """ViT-B-32 with random weights (same compute as the real one), saved once as local-dir; returns the id."""
    folder = Path(folder or Path(tempfile.gettempdir()) / "imgsearch-bench-vitb32")
    if not (folder / "open_clip_model.safetensors").exists():
        import open_clip
        import torch

        from imgsearch.encoder import save_local_dir

        torch.manual_seed(0)
        cfg = open_clip.get_model_config("ViT-B-32")
        model = open_clip.create_model("ViT-B-32")
        save_local_dir(model, cfg, folder, {"size": 224})
    return f"local-dir:{folder}"


def _photo(args: tuple[Path, int, int, int, int]) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    folder, i, width, height, seed = args
    rng = np.random.default_rng([seed, i])  # per image, so any number of workers makes the same files
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(width // 20, width // 5))
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    noise = rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    tmp = folder / f"photo_{i:05d}.jpg.part"
    Image.fromarray(arr).save(tmp, format="JPEG", quality=90)
    tmp.rename(folder / f"photo_{i:05d}.jpg")  # an interrupted run never leaves a half-written photo


def make_photos(folder: str | os.PathLike, count: int, width: int, height: int, seed: int = 0) -> Path:
    """JPEG 'photos' with smooth colour fields, shapes and sensor-like noise (realistic file sizes).

    Made in parallel on every core (thousands of 1 MP photos for a GPU run take seconds, not minutes).
    """
    from concurrent.futures import ProcessPoolExecutor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(folder, i, width, height, seed) for i in range(count) if not (folder / f"photo_{i:05d}.jpg").exists()]
    if len(todo) > 50 and (os.cpu_count() or 1) > 1:
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_photo, todo, chunksize=16))
    else:
        for t in todo:
            _photo(t)
    return folder


def peak_child(cmd: list[str], env: dict | None = None) -> tuple[int, float, float, bytes, bytes]:
    """(exit code, peak RSS in MB, wall seconds, stdout, stderr) of ``cmd`` alone. Linux keeps a process's peak
    RSS across fork and exec, so a child of a big bench process reports the bench's size; the command runs under
    a small Python wrapper instead, whose children's peak is the command's own, and which times it."""
    wrapper = ("import resource,subprocess,sys,time;t=time.perf_counter();"
               "r=subprocess.run(sys.argv[1:],capture_output=True);w=time.perf_counter()-t;"
               "sys.stdout.buffer.write(r.stdout);sys.stderr.buffer.write(r.stderr);"
               "sys.stderr.write('\\n@peak %d %f %f' % (r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN)"
               ".ru_maxrss / 1024, w))")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True)
    err, _, tail = proc.stderr.rpartition(b"\n@peak ")
    rc, peak, wall = tail.split()
    return int(rc), float(peak), float(wall), proc.stdout, err
