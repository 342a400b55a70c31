"""Helpers shared by the bench scripts: a random-weight ViT-B-32 saved as a local-dir model, photo folders."""

from __future__ import annotations

import os
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


def make_photos(folder: str | os.PathLike, count: int, width: int, height: int, seed: int = 0) -> Path:
    """JPEG 'photos' with smooth colour fields, shapes and sensor-like noise (realistic file sizes)."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    existing = len(list(folder.glob("*.jpg")))
    for i in range(existing, count):
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.integers(0, width), rng.integers(0, height)
            r = int(rng.integers(width // 20, width // 5))
            d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        noise = rng.normal(0, 6, (height, width, 3))
        arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"photo_{i:05d}.jpg", quality=90)
    return folder
